"""Files, inodes and page caches: the slice of the VFS that mappings need.

Models ``struct file`` / ``struct inode`` / ``struct address_space``
(``include/linux/fs.h``) and ``fget``/``fput`` reference counting (``fs/file_table.c``).
A VMA mapping a file holds a reference on it, like ``vma->vm_file``; the last ``fput``
calls the file's ``release``; an unlinked inode is evicted once no file refers to it, by
its filesystem's ``super_operations.evict_inode`` (tmpfs and hugetlbfs free their page
caches there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .system import System
    from .vma import Vma

__all__ = ("AddressSpace", "FMODE_READ", "FMODE_WRITE", "File", "FileOperations", "Inode",
           "SuperOperations", "evict", "fput", "get_file")

FMODE_READ = 1
FMODE_WRITE = 2


class FileOperations:
    """``struct file_operations``: the callbacks a file type provides (None = absent)."""

    __slots__ = ("name", "mmap", "release", "unlocked_ioctl")

    def __init__(self, name: str, mmap: Callable[["File", "Vma"], int] | None = None,
                 release: Callable[["Inode | None", "File"], int] | None = None,
                 unlocked_ioctl: Callable[..., int] | None = None) -> None:
        self.name = name
        self.mmap = mmap
        self.release = release
        self.unlocked_ioctl = unlocked_ioctl


class SuperOperations:
    """``struct super_operations`` of a filesystem: what it does with its inodes."""

    __slots__ = ("name", "evict_inode")

    def __init__(self, name: str, evict_inode: Callable[["Inode"], None]) -> None:
        self.name = name
        self.evict_inode = evict_inode


class AddressSpace:
    """``struct address_space``: the page cache of one inode and the VMAs mapping it."""

    __slots__ = ("host", "pages", "i_mmap", "mapping_id", "__weakref__")

    def __init__(self, host: "Inode") -> None:
        self.host = host
        #: page index -> pfn of the cached page (head pfn for hugetlbfs pages)
        self.pages: dict[int, int] = {}
        self.i_mmap: list[Vma] = []
        self.mapping_id = 0

    @property
    def nrpages(self) -> int:
        return len(self.pages)

    @property
    def vmas(self) -> list["Vma"]:
        return self.i_mmap


class Inode:
    """``struct inode`` of tmpfs or hugetlbfs; *s_op* stands for ``inode->i_sb->s_op``
    (its name says which filesystem the inode belongs to)."""

    __slots__ = ("sys", "s_op", "i_size", "i_mapping", "nlink", "i_count", "name",
                 "huge", "resv")

    def __init__(self, system: "System", s_op: SuperOperations, size: int,
                 name: str = "") -> None:
        self.sys = system
        self.s_op = s_op
        self.i_size = size
        self.i_mapping = AddressSpace(self)
        system.mem.register_mapping(self.i_mapping)
        system.inodes.append(self)
        self.nlink = 0
        self.i_count = 0
        self.name = name
        #: hugetlbfs: page size order; 0 for tmpfs
        self.huge = 0
        #: hugetlbfs: huge pages reserved for this inode (shared mappings)
        self.resv = 0

    def __repr__(self) -> str:
        return f"Inode({self.s_op.name}:{self.name}, size={self.i_size})"


class File:
    """``struct file``: an open file; *f_count* counts fds and mappings holding it."""

    __slots__ = ("f_inode", "f_op", "f_mode", "private_data", "f_count", "name")

    def __init__(self, inode: Inode | None, f_op: FileOperations, f_mode: int,
                 private_data: Any = None, name: str = "") -> None:
        self.f_inode = inode
        self.f_op = f_op
        self.f_mode = f_mode
        self.private_data = private_data
        self.f_count = 1
        self.name = name
        if inode is not None:
            inode.i_count += 1

    def __repr__(self) -> str:
        return f"File({self.f_op.name}:{self.name}, count={self.f_count})"


def get_file(f: File) -> File:
    """``get_file()``: take another reference."""
    f.f_count += 1
    return f


def fput(f: File) -> None:
    """``fput()``: drop a reference; the last one releases the file, and an unlinked
    inode without users is evicted."""
    if f.f_count <= 0:
        raise AssertionError(f"fput of a released file {f}")
    f.f_count -= 1
    if f.f_count:
        return
    if f.f_op.release is not None:
        f.f_op.release(f.f_inode, f)
    inode = f.f_inode
    if inode is not None:
        inode.i_count -= 1
        if inode.i_count == 0 and inode.nlink == 0:
            evict(inode)


def evict(inode: Inode) -> None:
    """``evict()``: the last reference to an unlinked inode is gone; its filesystem frees
    what it holds."""
    if inode in inode.sys.inodes:
        inode.sys.inodes.remove(inode)
    inode.s_op.evict_inode(inode)

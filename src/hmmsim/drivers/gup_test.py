"""The ``gup_test`` debugfs file: ``mm/gup_test.c`` (CONFIG_GUP_TEST, built into both
reference kernels; the file is the same in 6.12 and 7.3).

``open("/sys/kernel/debug/gup_test", O_RDWR)`` is :func:`gup_test_open`. Its ioctls take a
``struct gup_test`` (:class:`GupTest`): GUP_FAST_BENCHMARK (``get_user_pages_fast``),
GUP_BASIC_TEST (``get_user_pages``), PIN_FAST_BENCHMARK (``pin_user_pages_fast``),
PIN_BASIC_TEST (``pin_user_pages``), PIN_LONGTERM_BENCHMARK (``pin_user_pages`` with
FOLL_LONGTERM) and DUMP_USER_PAGES_TEST take the pages of ``[addr, addr + size)``,
``nr_pages_per_call`` at a time, check that pinned pages are pinned (and long-term
pinnable for PIN_LONGTERM_BENCHMARK: a WARN otherwise), then put them back; ``size``
comes back as the bytes covered. PIN_LONGTERM_TEST_START/STOP/READ keep pages pinned
with FOLL_LONGTERM between calls (one set per machine, as the driver's statics) and copy
them to user memory. The benchmark times (``get_delta_usec``, ``put_delta_usec``) are 0.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..kernel.cpu import copy_to_user
from ..kernel.errno import EFAULT, EINVAL
from ..kernel.fs import FMODE_READ, FMODE_WRITE, File, FileOperations
from ..kernel.gup import (
    FOLL_LONGTERM,
    FOLL_WRITE,
    folio_is_longterm_pinnable,
    folio_maybe_dma_pinned,
    get_user_pages,
    get_user_pages_fast,
    pin_user_pages,
    pin_user_pages_fast,
    put_page,
    unpin_user_pages,
)
from ..kernel.ioctl import _IO, _IOW, _IOWR
from ..kernel.mm import mmap_read_lock, mmap_read_unlock
from ..kernel.page_types import PAGE_SIZE, ULONG_MAX

if TYPE_CHECKING:
    from ..kernel.system import System
    from ..kernel.task import Task

__all__ = (
    "DUMP_USER_PAGES_TEST", "GUP_BASIC_TEST", "GUP_FAST_BENCHMARK", "GUP_TEST_FLAG_DUMP_PAGES_USE_PIN",
    "GUP_TEST_MAX_PAGES_TO_DUMP", "GupTest", "PIN_BASIC_TEST", "PIN_FAST_BENCHMARK",
    "PIN_LONGTERM_BENCHMARK", "PIN_LONGTERM_TEST_FLAG_USE_FAST", "PIN_LONGTERM_TEST_FLAG_USE_WRITE",
    "PIN_LONGTERM_TEST_READ", "PIN_LONGTERM_TEST_START", "PIN_LONGTERM_TEST_STOP", "PinLongtermTest",
    "gup_test_fops", "gup_test_ioctl", "gup_test_open",
)


GUP_TEST_MAX_PAGES_TO_DUMP = 8
GUP_TEST_FLAG_DUMP_PAGES_USE_PIN = 0x1
PIN_LONGTERM_TEST_FLAG_USE_WRITE = 1
PIN_LONGTERM_TEST_FLAG_USE_FAST = 2
#: ``sizeof(struct gup_test)``: 4 x u64, 3 x u32 and u32[8], padded to 8 bytes
_GUP_TEST_SIZE = 80
#: ``sizeof(struct pin_longterm_test)``: 2 x u64 and a u32, padded
_PIN_LONGTERM_TEST_SIZE = 24

GUP_FAST_BENCHMARK = _IOWR("g", 1, _GUP_TEST_SIZE)
PIN_FAST_BENCHMARK = _IOWR("g", 2, _GUP_TEST_SIZE)
PIN_LONGTERM_BENCHMARK = _IOWR("g", 3, _GUP_TEST_SIZE)
GUP_BASIC_TEST = _IOWR("g", 4, _GUP_TEST_SIZE)
PIN_BASIC_TEST = _IOWR("g", 5, _GUP_TEST_SIZE)
DUMP_USER_PAGES_TEST = _IOWR("g", 6, _GUP_TEST_SIZE)
PIN_LONGTERM_TEST_START = _IOW("g", 7, _PIN_LONGTERM_TEST_SIZE)
PIN_LONGTERM_TEST_STOP = _IO("g", 8)
PIN_LONGTERM_TEST_READ = _IOW("g", 9, 8)


@dataclass
class GupTest:
    """``struct gup_test``."""

    get_delta_usec: int = 0
    put_delta_usec: int = 0
    addr: int = 0
    size: int = 0
    nr_pages_per_call: int = 0
    gup_flags: int = 0
    test_flags: int = 0
    which_pages: list[int] = field(default_factory=lambda: [0] * GUP_TEST_MAX_PAGES_TO_DUMP)


@dataclass
class PinLongtermTest:
    """``struct pin_longterm_test``."""

    addr: int = 0
    size: int = 0
    flags: int = 0


#: the driver's statics ``pin_longterm_test_pages`` (per machine): the pinned pages, or None
_LONGTERM: "weakref.WeakKeyDictionary[System, list[int]]" = weakref.WeakKeyDictionary()


def _put_back_pages(sys: "System", cmd: int, pages: list[int], test_flags: int) -> None:
    """``put_back_pages()``."""
    if cmd in (GUP_FAST_BENCHMARK, GUP_BASIC_TEST) or (
            cmd == DUMP_USER_PAGES_TEST and not test_flags & GUP_TEST_FLAG_DUMP_PAGES_USE_PIN):
        for p in pages:
            put_page(sys, p)
    elif cmd in (PIN_FAST_BENCHMARK, PIN_BASIC_TEST, PIN_LONGTERM_BENCHMARK, DUMP_USER_PAGES_TEST):
        unpin_user_pages(sys, pages)


def _verify_dma_pinned(sys: "System", cmd: int, pages: list[int]) -> None:
    """``verify_dma_pinned()``: WARN (counted as ``gup_test.warn``) if a pinned page is
    not pinned, or a long-term pinned one is not long-term pinnable."""
    if cmd not in (PIN_FAST_BENCHMARK, PIN_BASIC_TEST, PIN_LONGTERM_BENCHMARK):
        return
    for p in pages:
        if not folio_maybe_dma_pinned(sys, p) or (
                cmd == PIN_LONGTERM_BENCHMARK and not folio_is_longterm_pinnable(sys, p)):
            sys.stats.add("gup_test.warn")
            break


def __gup_test_ioctl(cmd: int, gup: GupTest, caller: "Task") -> int:
    """``__gup_test_ioctl()``."""
    sys = caller.sys
    mm = caller.mm
    if gup.addr > ULONG_MAX or gup.size > ULONG_MAX or gup.addr + gup.size > ULONG_MAX:
        return -EINVAL
    end = gup.addr + gup.size
    needs_mmap_lock = cmd not in (GUP_FAST_BENCHMARK, PIN_FAST_BENCHMARK)
    pages: list[int] = []
    if needs_mmap_lock:
        mmap_read_lock(mm)
    try:
        nr = gup.nr_pages_per_call
        addr = gup.addr
        while addr < end:
            if nr != gup.nr_pages_per_call:
                break
            nxt = addr + nr * PAGE_SIZE
            if nxt > end:
                nxt = end
                nr = (nxt - addr) // PAGE_SIZE
            if cmd == GUP_FAST_BENCHMARK:
                nr = get_user_pages_fast(caller, addr, nr, gup.gup_flags, pages)
            elif cmd == GUP_BASIC_TEST:
                nr = get_user_pages(caller, addr, nr, gup.gup_flags, pages)
            elif cmd == PIN_FAST_BENCHMARK:
                nr = pin_user_pages_fast(caller, addr, nr, gup.gup_flags, pages)
            elif cmd == PIN_BASIC_TEST:
                nr = pin_user_pages(caller, addr, nr, gup.gup_flags, pages)
            elif cmd == PIN_LONGTERM_BENCHMARK:
                nr = pin_user_pages(caller, addr, nr, gup.gup_flags | FOLL_LONGTERM, pages)
            elif cmd == DUMP_USER_PAGES_TEST:
                if gup.test_flags & GUP_TEST_FLAG_DUMP_PAGES_USE_PIN:
                    nr = pin_user_pages(caller, addr, nr, gup.gup_flags, pages)
                else:
                    nr = get_user_pages(caller, addr, nr, gup.gup_flags, pages)
            else:
                return -EINVAL
            if nr <= 0:
                break
            addr = nxt
        gup.get_delta_usec = 0
        gup.size = addr - gup.addr
        _verify_dma_pinned(sys, cmd, pages)
        if cmd == DUMP_USER_PAGES_TEST:
            gup.which_pages = [w if w <= len(pages) else 0 for w in gup.which_pages]
        _put_back_pages(sys, cmd, pages, gup.test_flags)
        gup.put_delta_usec = 0
    finally:
        if needs_mmap_lock:
            mmap_read_unlock(mm)
    return 0


def _pin_longterm_test_stop(sys: "System") -> None:
    """``pin_longterm_test_stop()``."""
    pages = _LONGTERM.pop(sys, None)
    if pages:
        unpin_user_pages(sys, pages)


def _pin_longterm_test_start(args: PinLongtermTest, caller: "Task") -> int:
    """``pin_longterm_test_start()``: pin ``[addr, addr + size)`` with FOLL_LONGTERM
    (FOLL_WRITE, fast as asked) and keep the pins."""
    sys = caller.sys
    if sys in _LONGTERM:
        return -EINVAL
    if args.flags & ~(PIN_LONGTERM_TEST_FLAG_USE_WRITE | PIN_LONGTERM_TEST_FLAG_USE_FAST):
        return -EINVAL
    if (args.addr | args.size) & (PAGE_SIZE - 1) or args.size > (ULONG_MAX >> 1):
        return -EINVAL
    nr_pages = args.size // PAGE_SIZE
    if not nr_pages:
        return -EINVAL
    flags = FOLL_LONGTERM | (FOLL_WRITE if args.flags & PIN_LONGTERM_TEST_FLAG_USE_WRITE else 0)
    fast = bool(args.flags & PIN_LONGTERM_TEST_FLAG_USE_FAST)
    mm = caller.mm
    if not fast:
        mmap_read_lock(mm)
    pages: list[int] = []
    _LONGTERM[sys] = pages
    ret = 0
    try:
        while nr_pages - len(pages):
            addr = args.addr + len(pages) * PAGE_SIZE
            if fast:
                cur = pin_user_pages_fast(caller, addr, nr_pages - len(pages), flags, pages)
            else:
                cur = pin_user_pages(caller, addr, nr_pages - len(pages), flags, pages)
            if cur < 0:
                _pin_longterm_test_stop(sys)
                ret = cur
                break
    finally:
        if not fast:
            mmap_read_unlock(mm)
    return ret


def _pin_longterm_test_read(user_addr: int, caller: "Task") -> int:
    """``pin_longterm_test_read()``: copy the pinned pages to *user_addr*."""
    sys = caller.sys
    pages = _LONGTERM.get(sys)
    if pages is None:
        return -EINVAL
    buf = np.empty((1, PAGE_SIZE), np.uint8)
    for i, p in enumerate(pages):
        sys.mem.read_pages(np.array([p], np.int64), buf)
        if copy_to_user(caller.mm, user_addr + i * PAGE_SIZE, buf[0]):
            return -EFAULT
    return 0


def gup_test_ioctl(file: File, cmd: int, arg: Any, caller: "Task") -> int:
    """``gup_test_ioctl()``: *arg* is a :class:`GupTest` (updated on success), a
    :class:`PinLongtermTest`, or for PIN_LONGTERM_TEST_READ the user address."""
    if cmd in (PIN_LONGTERM_TEST_START, PIN_LONGTERM_TEST_STOP, PIN_LONGTERM_TEST_READ):
        if cmd == PIN_LONGTERM_TEST_START:
            return _pin_longterm_test_start(arg, caller)
        if cmd == PIN_LONGTERM_TEST_STOP:
            _pin_longterm_test_stop(caller.sys)
            return 0
        return _pin_longterm_test_read(int(arg), caller)
    if cmd not in (GUP_FAST_BENCHMARK, PIN_FAST_BENCHMARK, PIN_LONGTERM_BENCHMARK, GUP_BASIC_TEST,
                   PIN_BASIC_TEST, DUMP_USER_PAGES_TEST):
        return -EINVAL
    gup = replace(arg, which_pages=list(arg.which_pages))  # copy_from_user
    ret = __gup_test_ioctl(cmd, gup, caller)
    if ret:
        return ret
    for k, v in vars(gup).items():  # copy_to_user
        setattr(arg, k, v)
    return 0


def gup_test_release(inode: Any, file: File) -> int:
    """``gup_test_release()``: drop the long-term pins of PIN_LONGTERM_TEST_START."""
    sys = file.private_data
    _pin_longterm_test_stop(sys)
    return 0


gup_test_fops = FileOperations("gup_test", release=gup_test_release, unlocked_ioctl=gup_test_ioctl)


def gup_test_open(sys: "System", task: "Task") -> int:
    """``open("/sys/kernel/debug/gup_test", O_RDWR)`` in *task*: an fd."""
    f = File(None, gup_test_fops, FMODE_READ | FMODE_WRITE, private_data=sys, name="gup_test")
    return task.fd_install(f)

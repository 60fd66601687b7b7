"""The mm system calls take ``unsigned long``/``size_t`` lengths and addresses: a negative
Python int is a huge value and gets the errno the kernel's own checks give it
(mm/vma.c:do_vmi_munmap, mm/mprotect.c:do_mprotect_pkey, mm/madvise.c:check_input_range,
mm/mmap.c:do_mmap, mm/mremap.c:check_mremap_params), and changes nothing."""

from __future__ import annotations

import pytest

from hmmsim.errors import HmmError
from hmmsim.kernel.errno import EINVAL, ENOMEM
from hmmsim.kernel.madvise import MADV_DONTNEED, do_madvise
from hmmsim.kernel.mmap import MAP_ANONYMOUS, MAP_HUGETLB, MAP_PRIVATE
from hmmsim.kernel.mprotect import do_mprotect
from hmmsim.kernel.mremap import MREMAP_FIXED, MREMAP_MAYMOVE, do_mremap
from hmmsim.kernel.page_types import PAGE_SIZE as P
from hmmsim.kernel.task import vm_mmap, vm_munmap
from hmmsim.kernel.vma import PROT_READ, PROT_WRITE


def _layout(proc) -> list[tuple[int, int, int]]:  # noqa: ANN001
    return [(v.vm_start, v.vm_end, v.vm_flags) for v in proc.mm.vma_list()]


def test_do_vmi_munmap_negative_length_einval(proc) -> None:  # noqa: ANN001
    a = proc.mmap(16 * P)
    proc.write(a, b"x" * (16 * P))
    before = _layout(proc)
    for length in (-P, -1, -(1 << 40)):
        assert vm_munmap(proc.mm, a + 4 * P, length) == -EINVAL
    assert vm_munmap(proc.mm, -P, P) == -EINVAL  # a negative start is above TASK_SIZE
    assert _layout(proc) == before
    assert proc.read(a + 15 * P, 1) == b"x"


def test_do_mprotect_pkey_negative_length_enomem(proc) -> None:  # noqa: ANN001
    a = proc.mmap(16 * P)
    before = _layout(proc)
    # PAGE_ALIGN(len) wraps: start + len <= start
    assert do_mprotect(proc.mm, a, -P, PROT_READ) == -ENOMEM
    assert do_mprotect(proc.mm, a, -1, PROT_READ) == -ENOMEM
    assert _layout(proc) == before
    proc.write(a + 15 * P, b"w")  # still writable


def test_check_input_range_negative_length_einval(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P)
    proc.write(a, b"keep")
    assert do_madvise(proc.mm, a, -1, MADV_DONTNEED) == -EINVAL      # rounds up to 0
    assert do_madvise(proc.mm, a, -P, MADV_DONTNEED) == -EINVAL      # start + len wraps
    assert proc.read(a, 4) == b"keep"


def test_do_mmap_negative_length_enomem(proc) -> None:  # noqa: ANN001
    flags = MAP_PRIVATE | MAP_ANONYMOUS
    rw = PROT_READ | PROT_WRITE
    assert vm_mmap(proc.mm, None, 0, -1, rw, flags) == -ENOMEM       # PAGE_ALIGN wraps to 0
    assert vm_mmap(proc.mm, None, 0, -P, rw, flags) == -ENOMEM       # larger than TASK_SIZE
    assert vm_mmap(proc.mm, None, 0, -P, rw, flags | MAP_HUGETLB) == -ENOMEM
    assert _layout(proc) == []


def test_check_mremap_params_negative_new_length_einval(proc) -> None:  # noqa: ANN001
    a = proc.mmap(4 * P)
    before = _layout(proc)
    assert do_mremap(proc.mm, a, 4 * P, -1, MREMAP_MAYMOVE) == -EINVAL     # new_len aligns to 0
    assert do_mremap(proc.mm, a, 4 * P, -P, MREMAP_MAYMOVE) == -EINVAL     # > TASK_SIZE
    assert do_mremap(proc.mm, a, 4 * P, 4 * P, MREMAP_MAYMOVE | MREMAP_FIXED, -(1 << 30)) == -EINVAL
    assert _layout(proc) == before


def test_do_mmap_file_offset_past_max_lfs_filesize_eoverflow(proc) -> None:  # noqa: ANN001
    from hmmsim.kernel.errno import EOVERFLOW
    from hmmsim.kernel.mmap import MAP_SHARED
    fd = proc.open_tmpfile(P)
    f = proc.task.fget(fd)
    rw = PROT_READ | PROT_WRITE
    assert vm_mmap(proc.mm, f, 0, P, rw, MAP_SHARED, -1) == -EOVERFLOW           # pgoff wraps
    assert vm_mmap(proc.mm, f, 0, P, rw, MAP_SHARED, (1 << 52) - 1) == -EOVERFLOW  # offset -4096
    assert _layout(proc) == []
    with pytest.raises(HmmError) as ei:
        proc.mmap(P, fd=fd, shared=True, offset=-P)
    assert ei.value.errno == EOVERFLOW

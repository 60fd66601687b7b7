"""Run scenarios (``spec/scenario.md`` + ``spec/scenario-conventions.md``) on a fresh
:class:`~hmmsim.kernel.system.System` and produce their JSON lines.

The runner plays the role of the C runner the reference outputs come from: regions get
their own 64 GiB slots (``0x100000000000 + i * 2**36``, start at ``A`` pages into the
slot), device commands use a fresh anonymous buffer outside the arena for ``ptr``, CPU
commands access pages one at a time and go on after a faulting page, ``fork`` runs the
block in a child process that then exits. Everything a command does goes through the
same kernel entry points a user program would reach.

Besides the spec's records, the runner may stop a scenario with
``{"error":"unsupported",...}`` (a command the model does not implement yet),
``{"error":"kernel-oops",...}`` (the real kernel would crash: conventions item 25) or
``{"error":"crash","signal":9}`` (the scenario's process was OOM-killed).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

try:  # ISA-L's crc32: the same CRC as zlib's, about 7x faster on the 2-core machine
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - a platform without the isal wheel
    from zlib import crc32

from ..drivers.dmirror import dmirror_open
from ..drivers.test_hmm_uapi import (
    HMM_DMIRROR_CHECK_EXCLUSIVE,
    HMM_DMIRROR_EXCLUSIVE,
    HMM_DMIRROR_FLAGS,
    HMM_DMIRROR_MIGRATE_ON_FAULT_TO_DEV,
    HMM_DMIRROR_MIGRATE_TO_DEV,
    HMM_DMIRROR_MIGRATE_TO_SYS,
    HMM_DMIRROR_READ,
    HMM_DMIRROR_READ_UNLOCKED,
    HMM_DMIRROR_RELEASE,
    HMM_DMIRROR_SNAPSHOT,
    HMM_DMIRROR_WRITE,
    HmmDmirrorCmd,
)
from ..kernel.bug import KernelOops, NotSupportedError
from ..kernel.cpu import SIGKILL, SigRun, translate_range
from ..kernel.errno import EBADF
from ..kernel.locking import DeadlockError
from ..kernel.madvise import (
    MADV_DONTNEED,
    MADV_FREE,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    do_madvise,
)
from ..kernel.mmap import MAP_ANONYMOUS, MAP_FIXED, MAP_HUGETLB, MAP_PRIVATE, MAP_SHARED
from ..kernel.mprotect import do_mprotect
from ..kernel.mremap import MREMAP_DONTUNMAP, MREMAP_FIXED, MREMAP_MAYMOVE, do_mremap
from ..kernel.page_types import PAGE_SHIFT, PAGE_SIZE
from ..kernel.profile import DEFAULT_KERNEL, get_profile
from ..kernel.shmem import shmem_file_setup, shmem_pread, shmem_pwrite, shmem_truncate
from ..kernel.system import GiB, MiB, System, SystemConfig
from ..kernel.task import Task, vm_mmap, vm_munmap
from ..kernel.vma import PROT_READ, PROT_WRITE
from .parse import Command, Fork, Scenario, ScenarioParseError, parse_scenario
from .uffd import ScenarioThreads

__all__ = ("ARENA_BASE", "REFERENCE_MEMORY_IN_USE", "SLOT_SIZE", "reference_config", "run_scenario",
           "run_scenario_text")

ARENA_BASE = 0x1000_0000_0000
SLOT_SIZE = 1 << 36
_PROTS = {"none": 0, "r": PROT_READ, "rw": PROT_READ | PROT_WRITE}
_ADVICE = {"hugepage": MADV_HUGEPAGE, "nohugepage": MADV_NOHUGEPAGE, "dontneed": MADV_DONTNEED,
           "free": MADV_FREE}
#: commands whose kernel side is not modelled yet, and what they need
_UNSUPPORTED: dict[str, str] = {}
#: pages handled per step by CPU commands and buffer copies (bounds memory for huge ranges)
_CHUNK = 4096
_WORDS = PAGE_SIZE // 4
#: words of pattern made per step when written straight into (or compared with) frames:
#: 64 pages, so the step's words stay in cache (1 GiB filled in 0.12 s instead of 0.20 s
#: through a 16 MiB chunk and a second copy)
_PATTERN_STEP = 64 * _WORDS
#: memory the reference VM's own kernel, initramfs and runner occupy beyond what the model
#: allocates (accounted, no frames): fitted to where the real kernels' OOM killer starts
#: ending device commands (a READ of untouched memory needs its buffer plus the bounce
#: buffer: 2 x 672 MiB passes, 2 x 704 MiB is killed, on 6.12 and 7.3; the recorded
#: ``oom_*`` scenarios)
REFERENCE_MEMORY_IN_USE = 96 * MiB


def reference_config(kernel: str = DEFAULT_KERNEL, *, ram: int = 1536 * MiB, thp: str = "madvise",
                     hugetlb_pages: int = 32, migrate_on_fault: bool = False) -> SystemConfig:
    """The machine the reference outputs come from (conventions item 24): a 2 GiB VM of
    which 512 MiB are the coherent devices' memory (*ram* is the rest), THP *thp*, huge
    zero page on, *hugetlb_pages* hugetlb pages, no swap, test_hmm loaded with coherent
    devices, running *kernel* (with *migrate_on_fault*: the unified fault+migrate walk on
    top of it, 7.3 only). ``totalram_pages()`` leaves out what that kernel keeps for
    itself (its struct page array, 1/64 of RAM, and the release's measured
    ``boot_reserved_pages``), so the overcommit heuristic refuses exactly the mmap sizes
    the real VM refuses: at the defaults, a private writable mapping of more than 383880
    pages (7.3) or 383306 pages (6.12) is -ENOMEM.

    >>> from hmmsim.kernel.system import System
    >>> System(reference_config("7.3")).mem.totalram_pages
    383880
    >>> reference_config("6.12", ram=4 << 30, thp="always").thp
    'always'
    """
    if ram <= 2 * REFERENCE_MEMORY_IN_USE:
        raise ValueError(f"RAM must be more than {2 * REFERENCE_MEMORY_IN_USE >> 20} MiB: the reference "
                         f"machine's kernel and runner alone use {REFERENCE_MEMORY_IN_USE >> 20} MiB")
    reserved = (ram >> PAGE_SHIFT) // 64 + get_profile(kernel).boot_reserved_pages
    return SystemConfig(ram=ram, thp=thp, huge_zero_page=True, hugetlb_pages=hugetlb_pages,
                        swap_pages=0, test_hmm=True, coherent=True, device_private_space=8 * GiB,
                        kernel=kernel, reserved_pages=reserved, migrate_on_fault=migrate_on_fault,
                        extra={"memory_in_use": REFERENCE_MEMORY_IN_USE})


class _Stop(Exception):
    """Stop the whole scenario after printing *record* (if any)."""

    def __init__(self, record: dict[str, Any] | None) -> None:
        super().__init__(record)
        self.record = record


@dataclass
class _Ctx:
    """What one process of a scenario knows: its task, name bindings, slot counter."""

    task: Task
    depth: int
    next_slot: int = 0
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)
    files: dict[str, int | None] = field(default_factory=dict)
    handles: dict[str, int | None] = field(default_factory=dict)

    def child(self, task: Task) -> "_Ctx":
        return _Ctx(task, self.depth + 1, self.next_slot, dict(self.regions), dict(self.files),
                    dict(self.handles))

    def slot(self) -> int:
        base = ARENA_BASE + self.next_slot * SLOT_SIZE
        self.next_slot += 1
        return base


def _pattern(seed: int, first_word: int, nwords: int) -> npt.NDArray[np.uint8]:
    """Pattern SEED: word k holds SEED + k (int32, wrapping); little-endian bytes."""
    out = np.arange(nwords, dtype="<u4")
    out += np.uint32((seed + first_word) & 0xFFFF_FFFF)
    return out.view(np.uint8)


class _Patterns:
    """Pattern words made in 32-bit words: a chunk into one reused buffer (a CPU command
    or a device buffer is filled or checked a chunk at a time), or a cache-sized step at
    a time straight into (or against) the frames of a run."""

    def __init__(self) -> None:
        self.base = np.arange(_CHUNK * _WORDS, dtype="<u4")
        self.buf = np.empty(_CHUNK * _WORDS, dtype="<u4")

    def chunk(self, seed: int, first_word: int, nwords: int) -> npt.NDArray[np.uint8]:
        """Words ``first_word .. first_word + nwords`` of pattern *seed* (at most one
        chunk), valid until the next call."""
        out = self.buf[:nwords]
        np.add(self.base[:nwords], np.uint32((seed + first_word) & 0xFFFF_FFFF), out=out)
        return out.view(np.uint8)

    def write(self, dst: npt.NDArray[np.uint32], seed: int, first_word: int) -> None:
        """Store words ``first_word ..`` of pattern *seed* into *dst* (any length)."""
        for k in range(0, len(dst), _PATTERN_STEP):
            part = dst[k:k + _PATTERN_STEP]
            np.add(self.base[:len(part)], np.uint32((seed + first_word + k) & 0xFFFF_FFFF), out=part)

    def mismatches(self, got: npt.NDArray[np.uint32], seed: int, first_word: int) -> int:
        """How many words of *got* differ from words ``first_word ..`` of pattern *seed*."""
        bad = 0
        for k in range(0, len(got), _PATTERN_STEP):
            part = got[k:k + _PATTERN_STEP]
            want = self.buf[:len(part)]
            np.add(self.base[:len(part)], np.uint32((seed + first_word + k) & 0xFFFF_FFFF), out=want)
            bad += int(np.count_nonzero(part != want))
        return bad


@dataclass
class _Frame:
    """One process running a block: its context, the nodes left, and the ``fork`` block
    it runs (None for the scenario's first process)."""

    ctx: _Ctx
    nodes: Iterator[Command | Fork]
    fork: Fork | None


class _Runner:
    def __init__(self, sys: System, emit: Callable[[dict[str, Any]], None],
                 after: Callable[[System, Command], None] | None = None) -> None:
        self.sys = sys
        self.emit = emit
        self.after = after
        self.patterns = _Patterns()
        self.threads = ScenarioThreads(sys)

    # -- plumbing -----------------------------------------------------------------------------
    @staticmethod
    def record(ctx: _Ctx, line: int, **fields: Any) -> dict[str, Any]:
        """An output record of line *line*, with ``proc`` when a child printed it."""
        rec: dict[str, Any] = {"line": line, **fields}
        if ctx.depth:
            rec["proc"] = ctx.depth
        return rec

    def out(self, ctx: _Ctx, cmd: Command | Fork, op: str, **fields: Any) -> None:
        self.emit(self.record(ctx, cmd.line, op=op, **fields))

    def run_block(self, ctx: _Ctx, body: Iterable[Command | Fork]) -> None:
        """Run *body* in *ctx*'s process. Nested ``fork`` blocks are run with an explicit
        stack of open forks (one frame per live child), not Python recursion, so the
        nesting depth is bounded by memory only, as on a real kernel (one process per
        level). A child killed by the OOM killer ends its own block only; a ``_Stop``
        exits every child still alive, innermost first, and propagates."""
        stack = [_Frame(ctx, iter(body), None)]
        try:
            while stack:
                frame = stack[-1]
                node = next(frame.nodes, None)
                if node is None:
                    stack.pop()
                    if frame.fork is not None:
                        self.end_fork(stack[-1].ctx, frame, died=False)
                elif isinstance(node, Fork):
                    stack.append(_Frame(self.run_fork(frame.ctx, node), iter(node.body), node))
                else:
                    try:
                        self.run_command(frame.ctx, node)
                    except _Killed:
                        if frame.fork is None:
                            raise
                        stack.pop()
                        self.end_fork(stack[-1].ctx, frame, died=True)
        finally:
            for frame in reversed(stack):
                if frame.fork is not None and not frame.ctx.task.exited:
                    frame.ctx.task.exit()

    def run_command(self, ctx: _Ctx, node: Command) -> None:
        """One command line (or the record that stops the scenario)."""
        if node.unknown_name:
            raise _Stop(self.record(ctx, node.line, error="unknown-name", op=node.op))
        if node.op in _UNSUPPORTED:
            raise _Stop({"error": "unsupported", "line": node.line, "op": node.op,
                         "message": f"{node.op} needs {_UNSUPPORTED[node.op]}, not modelled yet"})
        op = getattr(self, f"op_{node.op}")

        def body() -> None:
            with ctx.task.running():  # the command is a system call of this process
                op(ctx, node, *node.args)

        try:
            self.threads.run(ctx.task, body)
            if self.after is not None:
                self.after(self.sys, node)
        except DeadlockError as e:
            raise _Stop({"error": "kernel-hang", "line": node.line, "op": node.op, "message": str(e)}) from None
        except KernelOops as e:
            raise _Stop({"error": "kernel-oops", "line": node.line, "op": node.op, "message": str(e)}) from None
        except NotSupportedError as e:
            raise _Stop({"error": "unsupported", "line": node.line, "op": node.op, "message": str(e)}) from None

    def run_fork(self, ctx: _Ctx, node: Fork) -> _Ctx:
        """``fork``: print the line in the parent, fork; returns the child's context (the
        caller runs the block in it, then :meth:`end_fork`)."""
        self.out(ctx, node, "fork", ret=0)
        child = ctx.task.fork()
        if isinstance(child, int):
            raise _Stop({"error": "fork", "line": node.line, "ret": child})
        return ctx.child(child)

    def end_fork(self, ctx: _Ctx, frame: "_Frame", died: bool) -> None:
        """The child of *frame* has finished its block (or was killed): it exits, and
        the parent (*ctx*) prints ``endfork``."""
        if not frame.ctx.task.exited:
            frame.ctx.task.exit()
        assert frame.fork is not None
        self.emit(self.record(ctx, frame.fork.end_line, op="endfork", ret="child-died" if died else 0))

    def region(self, ctx: _Ctx, name: str, off: int) -> int:
        return ctx.regions[name][0] + (off << PAGE_SHIFT)

    # -- CPU --------------------------------------------------------------------------------------
    def _cpu(self, ctx: _Ctx, name: str, off: int, npages: int,
             access: Callable[[int, int, int], list[SigRun]]) -> tuple[int | None, bool]:
        """Access the pages in order, chunk by chunk: ``access(addr, first page of the
        chunk, pages)`` returns the chunk's signal runs. Pages outside every VMA fault
        without being visited one by one (work is bounded by what is mapped). Returns
        (first faulting page from the region start, killed)."""
        first_bad: int | None = None
        base = self.region(ctx, name, off)
        mm = ctx.task.mm
        c0 = 0
        while c0 < npages:
            addr = base + (c0 << PAGE_SHIFT)
            vma = mm.find_vma(addr)
            if vma is None or vma.vm_start > addr:  # SIGSEGV up to the next VMA
                if first_bad is None:
                    first_bad = off + c0
                if vma is None:
                    break
                c0 = min(npages, c0 + ((vma.vm_start - addr) >> PAGE_SHIFT))
                continue
            n = min(_CHUNK, npages - c0, (vma.vm_end - addr) >> PAGE_SHIFT)
            sigs = access(addr, c0, n)
            if sigs and first_bad is None:
                first_bad = off + c0 + sigs[0][0]
            if sigs and sigs[-1][2] == SIGKILL:
                return first_bad, True
            c0 += n
        return first_bad, False

    def _report_cpu(self, ctx: _Ctx, cmd: Command, bad: int | None, killed: bool, **ok: Any) -> None:
        if killed:
            raise _Killed()
        if bad is not None:
            self.out(ctx, cmd, cmd.op, ret="segv", page=bad)
        else:
            self.out(ctx, cmd, cmd.op, ret=0, **ok)

    def _write_pattern(self, mm: Any, addr: int, n: int, seed: int, first_word: int) -> list[SigRun]:
        """The CPU writes words ``first_word ..`` of pattern *seed* to the *n* pages at
        *addr* (:func:`user_write_pages` of the pattern: pages that raise a signal are
        skipped); returns the signal runs. Runs of consecutive frames get the pattern
        made straight into them; scattered frames get it through a chunk buffer."""
        pfns, sigs = translate_range(mm, addr, n, True)
        runs = self._frame_runs(pfns)
        mem = self.sys.mem
        if len(runs) > max(8, n // 16):
            pat = self.patterns.chunk(seed, first_word, n << 10).reshape(n, PAGE_SIZE)
            ok = pfns >= 0
            mem.write_pages(pfns[ok], pat[ok])
            return sigs
        u4 = mem.data.reshape(-1).view("<u4")
        for a, b, p in runs:
            self.patterns.write(u4[p << 10:(p + b - a) << 10], seed, first_word + (a << 10))
            mem.mark_written(np.arange(p, p + b - a, dtype=np.int64))
        return sigs

    def op_fill(self, ctx: _Ctx, cmd: Command, name: str, off: int, npages: int, seed: int) -> None:
        mm = ctx.task.mm

        def write(addr: int, c0: int, n: int) -> list[SigRun]:
            return self._write_pattern(mm, addr, n, seed, (off + c0) << 10)

        bad, killed = self._cpu(ctx, name, off, npages, write)
        self._report_cpu(ctx, cmd, bad, killed)

    def op_touch(self, ctx: _Ctx, cmd: Command, name: str, off: int, npages: int) -> None:
        mm = ctx.task.mm
        bad, killed = self._cpu(ctx, name, off, npages, lambda addr, c0, n: translate_range(mm, addr, n, False)[1])
        self._report_cpu(ctx, cmd, bad, killed)

    def _frame_runs(self, pfns: npt.NDArray[np.int64]) -> list[tuple[int, int, int]]:
        """``(first page, end page, first frame)`` of each run of consecutive frames among
        the pages that were read (pfn >= 0)."""
        ok = pfns >= 0
        cuts = np.flatnonzero((np.diff(pfns) != 1) | (ok[1:] != ok[:-1])) + 1
        bounds = [0, *cuts.tolist(), len(pfns)]
        return [(a, b, int(pfns[a])) for a, b in zip(bounds[:-1], bounds[1:]) if pfns[a] >= 0]

    def op_read(self, ctx: _Ctx, cmd: Command, name: str, off: int, npages: int) -> None:
        mm = ctx.task.mm
        data = self.sys.mem.data
        crc = [0]

        def read(addr: int, c0: int, n: int) -> list[SigRun]:
            # the CPU reads the frames it translated to (the crc only counts without a fault)
            pfns, sigs = translate_range(mm, addr, n, False)
            for a, b, p in self._frame_runs(pfns):
                crc[0] = crc32(data[p:p + (b - a)].reshape(-1), crc[0])
            return sigs

        bad, killed = self._cpu(ctx, name, off, npages, read)
        self._report_cpu(ctx, cmd, bad, killed, crc=crc[0])

    def op_check(self, ctx: _Ctx, cmd: Command, name: str, off: int, npages: int, seed: int) -> None:
        mm = ctx.task.mm
        data = self.sys.mem.data
        mismatch = [0]

        def check(addr: int, c0: int, n: int) -> list[SigRun]:
            pfns, sigs = translate_range(mm, addr, n, False)
            for a, b, p in self._frame_runs(pfns):
                got = data[p:p + (b - a)].reshape(-1).view("<u4")
                mismatch[0] += self.patterns.mismatches(got, seed, (off + c0 + a) << 10)
            return sigs

        bad, killed = self._cpu(ctx, name, off, npages, check)
        self._report_cpu(ctx, cmd, bad, killed, mismatch=mismatch[0])

    # -- regions -------------------------------------------------------------------------------------
    def op_mmap(self, ctx: _Ctx, cmd: Command, name: str, npages: int, prot: str, share: str,
                backing: str, backing_name: str | None, hugetlb: bool, align: int) -> None:
        if hugetlb:
            align = max(align, 512)
        start = ctx.slot() + (align << PAGE_SHIFT)
        ctx.regions[name] = (start, npages)
        flags = (MAP_SHARED if share == "shared" else MAP_PRIVATE) | MAP_FIXED
        file = None
        if backing == "anon":
            flags |= MAP_ANONYMOUS
        else:
            table = ctx.files if backing == "file" else ctx.handles
            assert backing_name is not None
            fd = table.get(backing_name)
            file = ctx.task.fget(fd) if fd is not None else None
            if file is None:
                self.out(ctx, cmd, "mmap", ret=-EBADF)
                return
        if hugetlb:
            flags |= MAP_HUGETLB
        ret = vm_mmap(ctx.task.mm, file, start, npages << PAGE_SHIFT, _PROTS[prot], flags)
        self.out(ctx, cmd, "mmap", ret=min(ret, 0))

    def op_munmap(self, ctx: _Ctx, cmd: Command, name: str, off: int, npages: int) -> None:
        ret = vm_munmap(ctx.task.mm, self.region(ctx, name, off), npages << PAGE_SHIFT)
        self.out(ctx, cmd, "munmap", ret=ret)

    def op_mprotect(self, ctx: _Ctx, cmd: Command, name: str, off: int, npages: int, prot: str) -> None:
        ret = do_mprotect(ctx.task.mm, self.region(ctx, name, off), npages << PAGE_SHIFT, _PROTS[prot])
        self.out(ctx, cmd, "mprotect", ret=ret)

    def op_madvise(self, ctx: _Ctx, cmd: Command, name: str, off: int, npages: int, advice: str) -> None:
        ret = do_madvise(ctx.task.mm, self.region(ctx, name, off), npages << PAGE_SHIFT, _ADVICE[advice])
        self.out(ctx, cmd, "madvise", ret=ret)

    def op_mremap(self, ctx: _Ctx, cmd: Command, name: str, new: str, npages: int, dontunmap: bool) -> None:
        start = ctx.regions[name][0]
        new_addr = ctx.slot() + (start % SLOT_SIZE)
        ctx.regions[new] = (new_addr, npages)
        flags = MREMAP_MAYMOVE | MREMAP_FIXED | (MREMAP_DONTUNMAP if dontunmap else 0)
        ret = do_mremap(ctx.task.mm, start, npages << PAGE_SHIFT, npages << PAGE_SHIFT, flags, new_addr)
        self.out(ctx, cmd, "mremap", ret=min(ret, 0))

    # -- files -----------------------------------------------------------------------------------------
    def op_file(self, ctx: _Ctx, cmd: Command, fname: str, npages: int) -> None:
        f = shmem_file_setup(self.sys, fname, 0)
        assert f.f_inode is not None
        ret = shmem_truncate(f.f_inode, npages << PAGE_SHIFT)
        ctx.files[fname] = ctx.task.fd_install(f)
        self.out(ctx, cmd, "file", ret=ret)

    def _file_inode(self, ctx: _Ctx, fname: str):  # noqa: ANN202
        fd = ctx.files.get(fname)
        f = ctx.task.fget(fd) if fd is not None else None
        return f.f_inode if f is not None else None

    def op_pwrite(self, ctx: _Ctx, cmd: Command, fname: str, off: int, npages: int, seed: int) -> None:
        inode = self._file_inode(ctx, fname)
        if inode is None:
            self.out(ctx, cmd, "pwrite", ret=-EBADF)
            return
        if npages:
            ret = shmem_pwrite(inode, _pattern(seed, off << 10, npages << 10), off << PAGE_SHIFT)
            if ret < 0:
                self.out(ctx, cmd, "pwrite", ret=ret)
                return
        self.out(ctx, cmd, "pwrite", ret=0)

    def op_pread(self, ctx: _Ctx, cmd: Command, fname: str, off: int, npages: int) -> None:
        inode = self._file_inode(ctx, fname)
        if inode is None:
            self.out(ctx, cmd, "pread", ret=-EBADF)
            return
        data = shmem_pread(inode, off << PAGE_SHIFT, npages << PAGE_SHIFT)
        self.out(ctx, cmd, "pread", ret=0, crc=crc32(data))

    # -- devices ---------------------------------------------------------------------------------------
    def op_uffd(self, ctx: _Ctx, cmd: Command, name: str, off: int, npages: int, seed: int) -> None:
        ret = self.threads.uffd(ctx.task, self.region(ctx, name, off), npages, ctx.regions[name][0], seed, _pattern)
        self.out(ctx, cmd, "uffd", ret=ret)

    def op_open(self, ctx: _Ctx, cmd: Command, handle: str, dev: int) -> None:
        fd = dmirror_open(self.sys, ctx.task, dev)
        ctx.handles[handle] = fd if fd >= 0 else None
        self.out(ctx, cmd, "open", ret=min(fd, 0))

    def op_close(self, ctx: _Ctx, cmd: Command, handle: str) -> None:
        fd = ctx.handles.get(handle)
        ret = ctx.task.close_fd(fd) if fd is not None else -EBADF
        ctx.handles[handle] = None
        self.out(ctx, cmd, "close", ret=ret)

    def _ioctl(self, ctx: _Ctx, handle: str, command: int, addr: int, npages: int, touched: int,
               seed: int | None = None, first_word: int = 0,
               consume: Callable[[int], None] | None = None,
               overwritten: bool = False) -> tuple[int, HmmDmirrorCmd]:
        """One device command through a fresh buffer (conventions item 19): NPAGES pages
        (one if 0), private anonymous, MAP_POPULATE, unmapped afterwards. The first
        *touched* pages (those the command writes or reads) are faulted in; the others
        are only accounted against RAM (``PhysMem.charge``). With *seed*, the buffer is
        filled with that pattern first (``dwrite``); *consume(buf)* reads the buffer back
        after a successful ioctl. If the kernel runs out of memory on the way (an OOM
        event: populating, the driver's vmalloc, a fault), the OOM killer ends the
        process, as it does on the reference machine.

        *overwritten*: a successful ioctl writes every byte of the touched pages (or the
        pattern does, with *seed*), so their frames are not cleared when they are
        allocated (``PhysMem.overwritten``: nothing reads them first); if the ioctl does
        not succeed, the pages are cleared before the buffer goes, which leaves every
        frame as clearing them at allocation would have."""
        fd = ctx.handles.get(handle)
        dcmd = HmmDmirrorCmd(addr=addr, npages=npages)
        if fd is None or ctx.task.fget(fd) is None:  # no buffer is mapped for a bad handle
            return -EBADF, dcmd
        mm = ctx.task.mm
        mem = self.sys.mem
        nbuf = max(npages, 1)
        length = nbuf << PAGE_SHIFT
        buf = vm_mmap(mm, None, 0, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)
        if buf < 0:
            return buf, dcmd
        charged = 0
        oom = mem.oom_events
        # no clearing when nothing else may run meanwhile (no simulated thread's hooks)
        overwritten = overwritten and not self.sys.ls.has_hooks
        unwritten: list[npt.NDArray[np.int64]] = []  # populated pages no pattern went into
        done = False
        try:
            touched = min(touched, nbuf)
            with mem.overwritten() if overwritten else nullcontext():
                for c0 in range(0, touched, _CHUNK):  # MAP_POPULATE of the pages used
                    n = min(_CHUNK, touched - c0)
                    a = buf + (c0 << PAGE_SHIFT)
                    if seed is not None:
                        sigs = self._write_pattern(mm, a, n, seed, first_word + (c0 << 10))
                    else:
                        pfns, sigs = translate_range(mm, a, n, True)
                        if overwritten:
                            unwritten.append(pfns[pfns >= 0])
                    if sigs and sigs[-1][2] == SIGKILL:
                        raise _Killed()
            if not mem.charge(nbuf - touched):  # ... and of the pages nothing touches
                raise _Killed()
            charged = nbuf - touched
            dcmd.ptr = buf
            ret = ctx.task.ioctl(fd, command, dcmd)
            done = ret == 0
            if mem.oom_events != oom:
                raise _Killed()
            if ret == 0 and consume is not None:
                consume(buf)
            return ret, dcmd
        finally:
            if unwritten and not done:  # the ioctl did not write the pages: clear them now
                mem.clear_pages(np.concatenate(unwritten))
            mem.uncharge(charged)
            vm_munmap(mm, buf, length)

    def _read_buffer(self, mm: Any, buf: int, nbytes: int, sink: Callable[[npt.NDArray[np.uint8]], None]) -> None:
        """The CPU reads *nbytes* of the buffer at *buf* into *sink*, a chunk at a time;
        runs of consecutive frames are handed over as views of the frames (no copy)."""
        npg = (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT
        data = self.sys.mem.data
        left = nbytes
        for c0 in range(0, npg, _CHUNK):
            n = min(_CHUNK, npg - c0)
            pfns, sigs = translate_range(mm, buf + (c0 << PAGE_SHIFT), n, False)
            if sigs:
                if sigs[-1][2] == SIGKILL:
                    raise _Killed()
                raise AssertionError("the runner's populated buffer faulted")
            cuts = [0, *(np.flatnonzero(np.diff(pfns) != 1) + 1).tolist(), n]
            for i, j in zip(cuts[:-1], cuts[1:]):
                p = int(pfns[i])
                view = data[p:p + (j - i)].reshape(-1)[:left]
                sink(view)
                left -= len(view)

    def _ioctl_crc(self, ctx: _Ctx, handle: str, command: int, name: str, off: int,
                   npages: int) -> tuple[int, HmmDmirrorCmd, int]:
        """A device command that fills its NPAGES-page buffer (every byte of it when it
        succeeds); also returns the buffer's crc."""
        mm = ctx.task.mm
        crc = [0]

        def consume(buf: int) -> None:
            def sink(data: npt.NDArray[np.uint8]) -> None:
                crc[0] = crc32(data, crc[0])
            self._read_buffer(mm, buf, npages << PAGE_SHIFT, sink)

        ret, dcmd = self._ioctl(ctx, handle, command, self.region(ctx, name, off), npages,
                                npages, consume=consume, overwritten=True)
        return ret, dcmd, crc[0]

    def op_dread(self, ctx: _Ctx, cmd: Command, handle: str, name: str, off: int, npages: int,
                 command: int = HMM_DMIRROR_READ, op: str = "dread") -> None:
        ret, dcmd, crc = self._ioctl_crc(ctx, handle, command, name, off, npages)
        if ret:
            self.out(ctx, cmd, op, ret=ret)
        else:
            self.out(ctx, cmd, op, ret=0, cpages=dcmd.cpages, faults=dcmd.faults, crc=crc)

    def op_dread_unlocked(self, ctx: _Ctx, cmd: Command, handle: str, name: str, off: int,
                          npages: int) -> None:
        self.op_dread(ctx, cmd, handle, name, off, npages, HMM_DMIRROR_READ_UNLOCKED, "dread_unlocked")

    def op_dwrite(self, ctx: _Ctx, cmd: Command, handle: str, name: str, off: int, npages: int, seed: int) -> None:
        ret, dcmd = self._ioctl(ctx, handle, HMM_DMIRROR_WRITE, self.region(ctx, name, off), npages,
                                npages, seed=seed, first_word=off << 10, overwritten=True)
        if ret:
            self.out(ctx, cmd, "dwrite", ret=ret)
        else:
            self.out(ctx, cmd, "dwrite", ret=0, cpages=dcmd.cpages, faults=dcmd.faults)

    def op_dsnapshot(self, ctx: _Ctx, cmd: Command, handle: str, name: str, off: int, npages: int) -> None:
        mm = ctx.task.mm
        parts: list[str] = []

        def consume(buf: int) -> None:
            self._read_buffer(mm, buf, npages, lambda data: parts.append(bytes(data).hex()))

        ret, dcmd = self._ioctl(ctx, handle, HMM_DMIRROR_SNAPSHOT, self.region(ctx, name, off), npages,
                                (npages + PAGE_SIZE - 1) >> PAGE_SHIFT, consume=consume)
        if ret:
            self.out(ctx, cmd, "dsnapshot", ret=ret)
        else:
            self.out(ctx, cmd, "dsnapshot", ret=0, cpages=dcmd.cpages, prot="".join(parts))

    def _ioctl_no_buffer(self, ctx: _Ctx, handle: str, command: int, addr: int, npages: int) -> int:
        """A device command whose ``ptr`` is NULL (the runner maps no buffer)."""
        fd = ctx.handles.get(handle)
        if fd is None or ctx.task.fget(fd) is None:
            return -EBADF
        return ctx.task.ioctl(fd, command, HmmDmirrorCmd(addr=addr, npages=npages))

    def op_dmigrate(self, ctx: _Ctx, cmd: Command, handle: str, name: str, off: int, npages: int) -> None:
        ret, dcmd, crc = self._ioctl_crc(ctx, handle, HMM_DMIRROR_MIGRATE_TO_DEV, name, off, npages)
        if ret:
            self.out(ctx, cmd, "dmigrate", ret=ret)
        else:
            self.out(ctx, cmd, "dmigrate", ret=0, cpages=dcmd.cpages, crc=crc)

    def op_dmigrate_on_fault(self, ctx: _Ctx, cmd: Command, handle: str, name: str, off: int, npages: int) -> None:
        """HMM_DMIRROR_MIGRATE_ON_FAULT_TO_DEV (the unified walk; -EINVAL without it)."""
        ret, dcmd, crc = self._ioctl_crc(ctx, handle, HMM_DMIRROR_MIGRATE_ON_FAULT_TO_DEV, name, off, npages)
        if ret:
            self.out(ctx, cmd, "dmigrate_on_fault", ret=ret)
        else:
            self.out(ctx, cmd, "dmigrate_on_fault", ret=0, cpages=dcmd.cpages, crc=crc)

    def op_dmigrate_sys(self, ctx: _Ctx, cmd: Command, handle: str, name: str, off: int, npages: int) -> None:
        ret, dcmd = self._ioctl(ctx, handle, HMM_DMIRROR_MIGRATE_TO_SYS, self.region(ctx, name, off), npages, 0)
        if ret:
            self.out(ctx, cmd, "dmigrate_sys", ret=ret)
        else:
            self.out(ctx, cmd, "dmigrate_sys", ret=0, cpages=dcmd.cpages)

    def op_dexclusive(self, ctx: _Ctx, cmd: Command, handle: str, name: str, off: int, npages: int) -> None:
        ret, dcmd, crc = self._ioctl_crc(ctx, handle, HMM_DMIRROR_EXCLUSIVE, name, off, npages)
        if ret:
            self.out(ctx, cmd, "dexclusive", ret=ret)
        else:
            self.out(ctx, cmd, "dexclusive", ret=0, cpages=dcmd.cpages, crc=crc)

    def op_dcheck_exclusive(self, ctx: _Ctx, cmd: Command, handle: str, name: str, off: int, npages: int) -> None:
        ret = self._ioctl_no_buffer(ctx, handle, HMM_DMIRROR_CHECK_EXCLUSIVE, self.region(ctx, name, off), npages)
        self.out(ctx, cmd, "dcheck_exclusive", ret=ret)

    def op_drelease(self, ctx: _Ctx, cmd: Command, handle: str) -> None:
        ret = self._ioctl_no_buffer(ctx, handle, HMM_DMIRROR_RELEASE, 0, 1)
        self.out(ctx, cmd, "drelease", ret=ret)

    def op_dflags(self, ctx: _Ctx, cmd: Command, handle: str, value: int) -> None:
        ret = self._ioctl_no_buffer(ctx, handle, HMM_DMIRROR_FLAGS, 0, value)
        self.out(ctx, cmd, "dflags", ret=ret)


class _Killed(Exception):
    """The scenario's process was killed (OOM)."""


def run_scenario(scenario: Scenario, emit: Callable[[dict[str, Any]], None],
                 config: SystemConfig | None = None,
                 after: Callable[[System, Command], None] | None = None) -> System:
    """Run a parsed scenario on a fresh System, calling *emit* with each output record
    (and *after*, if given, after each command: tests use it to check invariants).
    Returns the System (for inspection)."""
    config = config or reference_config()
    sys = System(config)
    in_use = int(config.extra.get("memory_in_use", 0)) >> PAGE_SHIFT
    if in_use and not sys.mem.charge(in_use):
        raise ValueError("the machine has less RAM than the memory it starts with in use")
    task = sys.create_task("scenario")
    runner = _Runner(sys, emit, after)
    ctx = _Ctx(task, 0)
    try:
        runner.run_block(ctx, scenario.body)
    except _Stop as stop:
        if stop.record is not None:
            emit(stop.record)
        return sys
    except _Killed:
        emit({"error": "crash", "signal": SIGKILL})
        return sys
    finally:
        runner.threads.close()
    task.exit()
    return sys


def dumps(record: dict[str, Any]) -> str:
    """One output line: keys sorted, no spaces."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def run_scenario_text(data: bytes | str, config: SystemConfig | None = None,
                      after: Callable[[System, Command], None] | None = None) -> list[str]:
    """Parse and run a scenario; returns its output lines (a parse error is one line,
    with the parser's reason as ``message``).

    >>> text = b'''hmmsim-scenario 1
    ... mmap a 4 rw private,anon
    ... fill a 0 4 7
    ... open d 0
    ... dread d a 0 4
    ... fork
    ... check a 0 4 7
    ... endfork
    ... munmap a 0 4
    ... touch a 0 1
    ... '''
    >>> for line in run_scenario_text(text): print(line)
    {"line":2,"op":"mmap","ret":0}
    {"line":3,"op":"fill","ret":0}
    {"line":4,"op":"open","ret":0}
    {"cpages":4,"crc":2705220698,"faults":1,"line":5,"op":"dread","ret":0}
    {"line":6,"op":"fork","ret":0}
    {"line":7,"mismatch":0,"op":"check","proc":1,"ret":0}
    {"line":8,"op":"endfork","ret":0}
    {"line":9,"op":"munmap","ret":0}
    {"line":10,"op":"touch","page":0,"ret":"segv"}
    >>> run_scenario_text("hmmsim-scenario 1\\nmmap a 1 rw privat,anon\\n")
    ['{"error":"parse","line":2,"message":"bad mmap flags \\'privat,anon\\'"}']
    """
    try:
        sc = parse_scenario(data)
    except ScenarioParseError as e:
        return [dumps({"error": "parse", "line": e.line, "message": e.reason})]
    lines: list[str] = []
    run_scenario(sc, lambda r: lines.append(dumps(r)), config, after)
    return lines


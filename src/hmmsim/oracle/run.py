"""``hmmsim oracle run`` (boot a kernel image in qemu and run scenarios or hmm-tests on it)
and ``hmmsim oracle runner --build`` (compile the C scenario runner).

``hmmsim oracle run --kernel K|--image DIR [options] FILE...``
    Boots the image (:mod:`hmmsim.oracle.cache` says where images live and what they
    hold) on the machine of the scenario spec's environment (conventions item 24): 2 CPUs,
    2 GiB of which 512 MiB (``memmap=512M$0x40000000``) are the coherent devices' memory,
    devices 0/1 device-private and 2/3 device-coherent, 32 hugetlb pages, THP ``madvise``
    unless ``--thp``, the huge zero page on, khugepaged asleep, no swap; KVM when
    ``/dev/kvm`` works, TCG otherwise. Prints the files' JSON lines exactly as
    ``hmmsim run`` prints them (``{"file":NAME}`` before each when there are several).
    Kernel WARN/BUG/Oops lines go to stderr as ``hmmsim-oracle (NAME): kernel: [TIME]
    MESSAGE``, NAME being the file that was running. Exit status (as ``kernel-run``'s,
    so :class:`hmmsim.oracle.backend.KernelRunner` can use it): 0 the payload finished,
    125 the kernel crashed or hung (a file that made no progress for ``--file-timeout``
    seconds is a hang), 124 the whole boot took longer than ``--timeout``, 2 bad usage.
``hmmsim oracle run ... --selftest [-- ARGS]``
    Runs the image's static ``hmm-tests`` (with ARGS) instead and prints its TAP output.
``hmmsim oracle runner --build [--out PATH]``
    Compiles ``runner/*.c`` (gcc, ``-static``) for a user who runs scenarios as root on
    a machine with test_hmm loaded; prints where it went.

This module models no kernel code."""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.resources
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .cache import KernelImage, cache_root, find_image, image_dir
from .console import BootReport, parse_console, parse_program
from .initramfs import KMSG_END, SPM_ADDR, InitramfsSpec, make_initramfs

__all__ = (
    "EXIT_CRASH",
    "EXIT_TIMEOUT",
    "QemuEnd",
    "RUNNER_SOURCES",
    "RunOptions",
    "RunnerBuildError",
    "add_oracle_parsers",
    "build_runner",
    "cached_runner",
    "is_static_elf",
    "kernel_cmdline",
    "kvm_usable",
    "oracle_command",
    "qemu_argv",
    "run_files",
    "run_selftest",
    "runner_for",
)

EXIT_TIMEOUT = 124
EXIT_CRASH = 125
EXIT_USAGE = 2
#: a KVM boot that has not printed the kernel's banner after this long is retried with TCG
KVM_PROBE_SECONDS = 20
#: after the payload's end marker, qemu gets this long to reboot (exit) before it is killed:
#: a hung kernel may never get through the reboot
END_GRACE_SECONDS = 10
#: the host's own hang watchdog: no payload output for the file timeout plus this long
#: (the guest runner's timeout did not fire either: the guest is wedged) stops the boot
STALL_MARGIN_SECONDS = 30
#: the C runner's files, in ``runner/`` beside this module
RUNNER_SOURCES = ("hmmsim-runner.c", "parse.c", "exec.c", "device.c", "out.c", "runner.h")
PREFIX = "hmmsim-oracle"


class RunnerBuildError(RuntimeError):
    """The C runner did not compile (the compiler's messages are in the text)."""


def runner_source_dir() -> Path:
    """The directory of the C runner's sources (package data)."""
    return Path(str(importlib.resources.files("hmmsim.oracle").joinpath("runner")))


def build_runner(out: Path, static: bool = True, cc: str = "gcc") -> Path:
    """Compile the C runner into *out* (C11, -O2, -Wall -Wextra, -static if *static*)."""
    src = runner_source_dir()
    if shutil.which(cc) is None:
        raise RunnerBuildError(f"no C compiler {cc!r} (install gcc)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    cmd = [cc, "-std=c11", "-O2", "-Wall", "-Wextra", *(["-static"] if static else []), "-o", str(tmp),
           *(str(src / f) for f in RUNNER_SOURCES if f.endswith(".c")), "-lpthread"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RunnerBuildError(f"{' '.join(cmd)}\n{res.stderr.strip()}")
    os.replace(tmp, out)
    return out


def _sources_key() -> str:
    h = hashlib.sha256()
    src = runner_source_dir()
    for f in RUNNER_SOURCES:
        h.update(f.encode() + b"\0" + (src / f).read_bytes())
    return h.hexdigest()[:16]


def cached_runner(env: dict[str, str] | None = None) -> Path:
    """A static runner built from this package's sources, in ``CACHE/runner/`` (built on
    first use, rebuilt when the sources change)."""
    out = cache_root(env) / "runner" / f"hmmsim-runner-{_sources_key()}"
    if not out.is_file():
        build_runner(out, static=True)
    return out


def runner_for(image: KernelImage) -> Path:
    """The runner to put into *image*'s boots: one built from this package's sources
    (:func:`cached_runner`), or the image's own ``hmmsim-runner`` when there is no
    compiler here."""
    try:
        return cached_runner()
    except RunnerBuildError:
        if image.runner is not None:
            return image.runner
        raise


def is_static_elf(path: Path) -> bool:
    """Whether *path* is an ELF executable without a program interpreter (static)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit ELF only
            return False
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))  # PT_INTERP


def kvm_usable() -> bool:
    """Whether ``/dev/kvm`` can be opened and answers KVM_GET_API_VERSION, and is not
    PVM's KVM (``kvm_pvm``: it runs only PVM-enabled guest kernels; an ordinary bzImage
    stops in its setup code there). A KVM that fails otherwise is caught at boot: no
    kernel output within :data:`KVM_PROBE_SECONDS` means TCG is used instead."""
    if Path("/sys/module/kvm_pvm").exists():
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, 0xAE00) == 12  # KVM_GET_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass
class RunOptions:
    """How to boot: THP mode, time bounds (whole boot; per scenario file), accelerator
    (``auto``, ``kvm``, ``tcg``), whether to copy the console to stderr, where to keep
    the logs."""

    thp: str = "madvise"
    timeout: int = 600
    file_timeout: int = 120
    accel: str = "auto"
    console: bool = False
    keep: Path | None = None


def kernel_cmdline(thp: str, builtin_test_hmm: bool) -> str:
    """The kernel command line of the reference machine.

    >>> kernel_cmdline("madvise", False)  # doctest: +NORMALIZE_WHITESPACE
    'console=ttyS0 panic=-1 printk.time=1 printk.devkmsg=on hugepages=32 transparent_hugepage=madvise memmap=512M$0x40000000'
    """
    parts = ["console=ttyS0", "panic=-1", "printk.time=1", "printk.devkmsg=on", "hugepages=32",
             f"transparent_hugepage={thp}", f"memmap=512M${SPM_ADDR[0]:#x}"]
    if builtin_test_hmm:
        parts += [f"test_hmm.spm_addr_dev0={SPM_ADDR[0]:#x}", f"test_hmm.spm_addr_dev1={SPM_ADDR[1]:#x}"]
    return " ".join(parts)


def qemu_argv(image: KernelImage, initrd: Path, workdir: Path, thp: str, kvm: bool) -> list[str]:
    """The qemu command line: 2 CPUs, 2 GiB, the console on the first serial port (to
    ``console.raw``), the payload on the second (``program.raw``), no display."""
    accel = ["-accel", "kvm", "-cpu", "host"] if kvm else ["-accel", "tcg,thread=multi", "-cpu", "max"]
    return ["qemu-system-x86_64", *accel, "-m", "2G", "-smp", "2", "-nographic", "-no-reboot",
            "-kernel", str(image.bzimage), "-initrd", str(initrd),
            "-append", kernel_cmdline(thp, image.test_hmm_ko is None),
            "-serial", f"file:{workdir / 'console.raw'}", "-serial", f"file:{workdir / 'program.raw'}",
            "-monitor", "none"]


@dataclass
class _Boot:
    console: str
    program: str
    timed_out: bool
    stalled: bool
    report: BootReport
    seconds: float


class _ConsoleWatch:
    """Follows the console file while qemu runs: has the kernel started, has the payload
    ended (its marker in the kernel log)?"""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.tail = b""
        self.started = False
        self.ended = False

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                new = f.read()
        except OSError:
            return
        self.pos += len(new)
        text = self.tail + new
        self.started = self.started or b"Linux version" in text
        self.ended = self.ended or KMSG_END.encode() in text
        self.tail = text[-256:]


@dataclass
class QemuEnd:
    """How a qemu run ended: its exit status (None: killed by the KVM probe), its stderr,
    whether the whole-boot timeout or the stall watchdog stopped it."""

    rc: int | None
    stderr: bytes = b""
    timed_out: bool = False
    stalled: bool = False


def _qemu(argv: list[str], console: Path, timeout: float, probe: bool, stall: float | None = None) -> QemuEnd:
    """Run qemu (console in *console*, payload output in ``program.raw`` beside it). With
    *probe*, kill it if the kernel has printed nothing after KVM_PROBE_SECONDS. Once the
    payload has ended, qemu gets END_GRACE_SECONDS to exit, then it is killed. With
    *stall*, kill it when the payload has printed nothing for that long."""
    with open(console.parent / "qemu.err", "wb") as qerr:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=qerr, start_new_session=True)
    end = _wait_qemu(proc, _ConsoleWatch(console), console.parent / "program.raw", timeout, probe, stall)
    end.stderr = (console.parent / "qemu.err").read_bytes()
    return end


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _wait_qemu(proc: subprocess.Popen, watch: _ConsoleWatch, program: Path, timeout: float, probe: bool,
               stall: float | None) -> QemuEnd:
    t0 = time.monotonic()
    ended_at: float | None = None
    seen, seen_at = -1, t0
    try:
        while proc.poll() is None:
            now = time.monotonic()
            watch.poll()
            end = None
            size = _size(program)
            if size != seen:
                seen, seen_at = size, now
            if probe and not watch.started and now - t0 > KVM_PROBE_SECONDS:
                end = QemuEnd(None)
            elif watch.ended and ended_at is None:
                ended_at = now
            elif ended_at is not None and now - ended_at > END_GRACE_SECONDS:
                end = QemuEnd(0)
            elif now - t0 > timeout:
                end = QemuEnd(-9, timed_out=True)
            elif stall is not None and watch.started and not watch.ended and now - seen_at > stall:
                end = QemuEnd(-9, stalled=True)
            if end is not None:
                proc.kill()
                proc.wait()
                return end
            time.sleep(0.25)
        return QemuEnd(proc.returncode)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def _boot(image: KernelImage, spec: InitramfsSpec, opts: RunOptions, err: TextIO) -> _Boot:
    if shutil.which("qemu-system-x86_64") is None:
        raise FileNotFoundError("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    kvm = opts.accel == "kvm" or (opts.accel == "auto" and kvm_usable())
    with tempfile.TemporaryDirectory(prefix="hmmsim-oracle-") as d:
        work = Path(d)
        initrd = work / "initramfs.gz"
        initrd.write_bytes(make_initramfs(spec))
        t0 = time.monotonic()
        stall = spec.file_timeout + STALL_MARGIN_SECONDS if spec.selftest is None else None
        end = _qemu(qemu_argv(image, initrd, work, opts.thp, kvm), work / "console.raw", opts.timeout,
                    kvm and opts.accel == "auto", stall)
        if end.rc is None:  # KVM did not start the kernel: TCG
            err.write(f"{PREFIX}: KVM did not boot the kernel within {KVM_PROBE_SECONDS} s: using TCG\n")
            for f in ("console.raw", "program.raw"):
                (work / f).unlink(missing_ok=True)
            end = _qemu(qemu_argv(image, initrd, work, opts.thp, False), work / "console.raw",
                        opts.timeout - (time.monotonic() - t0), False, stall)
        seconds = time.monotonic() - t0
        if end.stderr.strip() and end.rc not in (0, None) and not (end.timed_out or end.stalled):
            err.write(f"{PREFIX}: qemu: {end.stderr.decode(errors='replace').strip()}\n")
        console = (work / "console.raw").read_bytes().decode(errors="replace").replace("\r", "") \
            if (work / "console.raw").exists() else ""
        program = (work / "program.raw").read_bytes().decode(errors="replace").replace("\r", "") \
            if (work / "program.raw").exists() else ""
        if opts.keep is not None:
            opts.keep.mkdir(parents=True, exist_ok=True)
            (opts.keep / "console.log").write_text(console)
            (opts.keep / "program.log").write_text(program)
    if opts.console:
        err.write(console)
    return _Boot(console, program, end.timed_out, end.stalled, parse_console(console), seconds)


def _report_events(boot: _Boot, names: Sequence[str], err: TextIO) -> None:
    for ev in boot.report.events:
        who = f" ({names[ev.file - 1]})" if 1 <= ev.file <= len(names) else ""
        err.write(f"{PREFIX}{who}: kernel: [{ev.time:>12}] {ev.message}\n")


def _end_status(boot: _Boot, running: str | None, timeout: int, err: TextIO) -> int:
    """0, or the status and message of a boot that did not finish its payload."""
    if boot.report.ended:
        return 0
    where = f" while running {running}" if running else ""
    if boot.timed_out:
        err.write(f"{PREFIX}: timeout after {timeout} s{where}\n")
        return EXIT_TIMEOUT
    err.write(f"{PREFIX}: the kernel crashed or hung before the payload finished{where} "
              "(--console shows why)\n")
    return EXIT_CRASH


def run_files(image: KernelImage, files: Sequence[Path], opts: RunOptions, runner: Path | None = None,
              out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Boot *image* once and run the scenario *files* in order; print their lines on
    *out* (stdout), kernel events and what went wrong on *err* (stderr); return the exit
    status (module docstring)."""
    out, err = out or sys.stdout, err or sys.stderr
    runner = runner or runner_for(image)
    spec = InitramfsSpec(runner=runner, files=list(files), test_hmm_ko=image.test_hmm_ko,
                         file_timeout=min(opts.file_timeout, opts.timeout))
    boot = _boot(image, spec, opts, err)
    names = [Path(f).name for f in files]
    outs, other, fail = parse_program(boot.program, len(files))
    separators = len(files) > 1
    running = None
    hang = None
    for o, name in zip(outs, names):
        if not o.started:
            continue
        running = name
        if separators:
            out.write(json.dumps({"file": name}, separators=(",", ":")) + "\n")
        for line in o.lines:
            out.write(line + "\n")
        if o.timed_out:
            hang = name
    out.flush()
    for line in other:
        err.write(f"{PREFIX}: guest: {line}\n")
    _report_events(boot, names, err)
    if fail is not None:
        err.write(f"{PREFIX}: the payload stopped: {fail} failed (is test_hmm.ko built for this bzImage?)\n")
    if hang is not None:
        err.write(f"{PREFIX}: {hang} made no progress for {spec.file_timeout} s: the kernel hangs "
                  "(--console shows the blocked tasks)\n")
        return EXIT_CRASH
    if boot.stalled and not boot.report.ended:
        err.write(f"{PREFIX}: {running or 'the boot'} made no progress for "
                  f"{spec.file_timeout + STALL_MARGIN_SECONDS} s and the guest did not stop it: "
                  "the kernel hangs (--console shows why)\n")
        return EXIT_CRASH
    status = _end_status(boot, running, opts.timeout, err)
    if status == 0 and fail is not None:
        return 1
    return status


def run_selftest(image: KernelImage, args: Sequence[str], opts: RunOptions, runner: Path | None = None,
                 out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Boot *image* and run its hmm-tests with *args*; print the TAP output."""
    out, err = out or sys.stdout, err or sys.stderr
    if image.hmm_tests is None:
        err.write(f"{PREFIX}: {image.path} has no hmm-tests\n")
        return EXIT_USAGE
    runner = runner or runner_for(image)
    spec = InitramfsSpec(runner=runner, test_hmm_ko=image.test_hmm_ko, hmm_tests=image.hmm_tests,
                         selftest=list(args))
    boot = _boot(image, spec, opts, err)
    _, other, fail = parse_program(boot.program, 0)
    for line in other:
        out.write(line + "\n")
    out.flush()
    _report_events(boot, [], err)
    if fail is not None:
        err.write(f"{PREFIX}: the payload stopped: {fail} failed\n")
    return _end_status(boot, "hmm-tests", opts.timeout, err)


# -- command line ------------------------------------------------------------------------------

def add_oracle_parsers(osub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's type
    """Add ``run`` and ``runner`` to the ``hmmsim oracle`` subcommands."""
    r = osub.add_parser("run", help="boot a kernel image in qemu and run scenarios (or hmm-tests) on it",
                        description="Boot a kernel image with test_hmm in qemu on the scenario spec's "
                        "machine and print the scenarios' JSON lines as `hmmsim run` prints them. "
                        "Exit status: 0 finished, 125 the kernel crashed or hung, 124 timeout, 2 usage.")
    r.add_argument("files", nargs="*", metavar="FILE")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--kernel", metavar="K", help="the cached image of release K (hmmsim oracle build)")
    g.add_argument("--image", metavar="DIR", help="an image directory (bzImage, [test_hmm.ko, hmm-tests])")
    r.add_argument("--thp", choices=("madvise", "always", "never"), default="madvise",
                   help="transparent_hugepage mode (default madvise, what the recorded outputs assume)")
    r.add_argument("--timeout", type=int, default=600, metavar="SEC", help="bound on the whole boot (default 600)")
    r.add_argument("--file-timeout", type=int, default=120, metavar="SEC",
                   help="a file making no progress this long is a kernel hang (default 120)")
    r.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="KVM when /dev/kvm works (auto, the default), or force one")
    r.add_argument("--console", action="store_true", help="copy the whole kernel console to stderr")
    r.add_argument("--keep", metavar="DIR", help="keep console.log and program.log in DIR")
    r.add_argument("--runner", metavar="PATH", help="a static hmmsim-runner to use (default: built from the package)")
    r.add_argument("--selftest", action="store_true",
                   help="run the image's hmm-tests instead (arguments after --)")
    b = osub.add_parser("runner", help="build the C scenario runner (run it as root where test_hmm is loaded)")
    b.add_argument("--build", action="store_true", required=True, help="compile it with gcc")
    b.add_argument("--out", metavar="PATH", default=None, help="where to put it (default ./hmmsim-runner)")
    b.add_argument("--dynamic", action="store_true", help="link dynamically (default: static)")


def _image_of(args: argparse.Namespace, err: TextIO) -> KernelImage | None:
    if args.image:
        try:
            return KernelImage.at(args.image)
        except FileNotFoundError as e:
            err.write(f"hmmsim oracle run: {e}\n")
            return None
    kernel = args.kernel or "7.3"
    img = find_image(kernel)
    if img is None:
        err.write(f"hmmsim oracle run: no image of {kernel} in {image_dir(kernel)}: build one with "
                  f"`hmmsim oracle build --kernel {kernel}`, or give --image DIR\n")
    return img


def oracle_command(args: argparse.Namespace, extra: Sequence[str] = (), out: TextIO | None = None,
                   err: TextIO | None = None) -> int | None:
    """Run ``hmmsim oracle run``/``runner`` (None if *args* is another oracle command).
    *extra* are the arguments after ``--`` (hmm-tests' with ``--selftest``)."""
    out, err = out or sys.stdout, err or sys.stderr
    if args.oracle_cmd == "runner":
        dest = Path(args.out or "hmmsim-runner")
        try:
            build_runner(dest, static=not args.dynamic)
        except RunnerBuildError as e:
            err.write(f"hmmsim oracle runner: {e}\n")
            return 1
        out.write(f"{dest.resolve()}\n")
        return 0
    if args.oracle_cmd != "run":
        return None
    if args.timeout < 1 or args.file_timeout < 1:
        err.write("hmmsim oracle run: --timeout and --file-timeout must be at least 1 second\n")
        return EXIT_USAGE
    if args.selftest == bool(args.files):
        err.write("hmmsim oracle run: give scenario FILEs, or --selftest [-- ARGS]\n")
        return EXIT_USAGE
    if extra and not args.selftest:
        err.write("hmmsim oracle run: arguments after -- go to hmm-tests (--selftest)\n")
        return EXIT_USAGE
    for f in args.files:
        if not Path(f).is_file():
            err.write(f"hmmsim oracle run: no such file: {f}\n")
            return EXIT_USAGE
    image = _image_of(args, err)
    if image is None:
        return EXIT_USAGE
    opts = RunOptions(thp=args.thp, timeout=args.timeout, file_timeout=args.file_timeout, accel=args.accel,
                      console=args.console, keep=Path(args.keep) if args.keep else None)
    runner = Path(args.runner) if args.runner else None
    try:
        runner = runner or runner_for(image)
        for exe in (runner, Path("/bin/busybox")):
            if not exe.is_file() or not is_static_elf(exe):
                err.write(f"hmmsim oracle run: {exe} is missing or not a static executable"
                          f"{' (apt-get install busybox-static)' if exe.name == 'busybox' else ''}\n")
                return EXIT_USAGE
        if args.selftest:
            return run_selftest(image, list(extra), opts, runner, out, err)
        return run_files(image, [Path(f) for f in args.files], opts, runner, out, err)
    except (RunnerBuildError, FileNotFoundError) as e:
        err.write(f"hmmsim oracle run: {e}\n")
        return EXIT_USAGE

"""The initramfs ``hmmsim oracle run`` boots: busybox, the scenario runner, hmm-tests,
test_hmm.ko, the scenario files, and an init script that sets up the machine of the
scenario spec's environment (``docs/scenario-conventions.md`` item 24) and runs the
payload.

Two serial ports: the kernel console on the first, the payload's output on the second
(the runner's JSON lines, hmm-tests' TAP output, and marker lines starting with ``@@hmmsim``
that :mod:`hmmsim.oracle.console` reads). The init script also writes markers into the
kernel log (``/dev/kmsg``), so every console line can be given to the scenario that was
running: ``hmmsim-oracle: file N`` before file N, ``hmmsim-oracle: end rc=RC`` when the
payload finished.

The archive is written in the ``newc`` cpio format by :func:`cpio_newc` (no ``cpio`` tool
needed) and gzip-compressed. This module models no kernel code."""

from __future__ import annotations

import gzip
import shlex
import stat
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = (
    "CpioEntry",
    "InitramfsSpec",
    "SPM_ADDR",
    "busybox_applets",
    "cpio_newc",
    "init_script",
    "make_initramfs",
    "payload_script",
)

#: where test_hmm's two coherent devices get their memory (``memmap=512M$0x40000000``
#: reserves it; devices 2 and 3 take 256 MiB each)
SPM_ADDR = (0x40000000, 0x50000000)
#: markers on the payload's serial line (see :mod:`hmmsim.oracle.console`)
FILE_MARK = "@@hmmsim-file"
RC_MARK = "@@hmmsim-rc"
FAIL_MARK = "@@hmmsim-fail"
#: markers in the kernel log
KMSG_FILE = "hmmsim-oracle: file"
KMSG_END = "hmmsim-oracle: end rc="


@dataclass
class CpioEntry:
    """One archive member: a directory, a regular file (``data``), a symlink (``target``)
    or a character device (``rdev``)."""

    name: str
    mode: int
    data: bytes = b""
    target: str = ""
    rdev: tuple[int, int] = (0, 0)


def cpio_newc(entries: Iterable[CpioEntry]) -> bytes:
    """The ``newc`` (SVR4, no CRC) cpio archive of *entries*, owned by root, mtime 0,
    ending with ``TRAILER!!!``.

    >>> a = cpio_newc([CpioEntry("init", 0o100755, b"#!/bin/sh\\n")])
    >>> a[:6], a[110:115], len(a) % 4
    (b'070701', b'init\\x00', 0)
    """
    out = bytearray()
    ino = 1

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for e in [*entries, CpioEntry("TRAILER!!!", 0)]:
        body = e.target.encode() if stat.S_ISLNK(e.mode) else e.data
        name = e.name.lstrip("/").encode() + b"\0"
        fields = (ino, e.mode, 0, 0, 2 if stat.S_ISDIR(e.mode) else 1, 0, len(body), 0, 0,
                  e.rdev[0], e.rdev[1], len(name), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(name)
        pad4()
        out.extend(body)
        pad4()
        ino += 1
    return bytes(out)


def busybox_applets(busybox: str | Path = "/bin/busybox") -> list[str]:
    """The applets *busybox* provides (``busybox --list``)."""
    res = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    return [a for a in res.stdout.split() if a and a != "busybox" and "/" not in a]


@dataclass
class InitramfsSpec:
    """What goes into the initramfs. ``files`` are the scenario files (their text is
    copied; they are run in order); with ``selftest`` set, hmm-tests runs instead with
    those arguments."""

    runner: Path
    busybox: Path = Path("/bin/busybox")
    files: Sequence[Path] = ()
    test_hmm_ko: Path | None = None
    hmm_tests: Path | None = None
    selftest: Sequence[str] | None = None
    file_timeout: int = 120
    applets: Sequence[str] = field(default_factory=list)


def _insmod(ko: str) -> str:
    return f"insmod {ko} spm_addr_dev0={SPM_ADDR[0]:#x} spm_addr_dev1={SPM_ADDR[1]:#x}"


#: device nodes for test_hmm's four devices, in case devtmpfs did not make them
_MKNODS = ("major=$(awk '$2 == \"HMM_DMIRROR\" { print $1 }' /proc/devices)\n"
           "for d in 0 1 2 3; do\n"
           "  [ -n \"$major\" ] && [ -e /sys/dev/char/$major:$d ] && [ ! -c /dev/hmm_dmirror$d ] && "
           "mknod -m 666 /dev/hmm_dmirror$d c $major $d\n"
           "done\n")


def payload_script(nfiles: int, module: bool, file_timeout: int,
                   selftest: Sequence[str] | None = None) -> str:
    """The payload, run by init with its output on the second serial port.

    Scenario files are ``/scen/N.hmm`` (N = 1..nfiles): for each, a ``@@hmmsim-file N``
    line and a ``hmmsim-oracle: file N`` kernel-log line, test_hmm loaded afresh (when it
    is a module), ``hmmsim-runner -t FILE_TIMEOUT`` on the file, ``@@hmmsim-rc N RC``,
    test_hmm unloaded. A runner timeout (status 7: the kernel hangs) stops the payload
    after asking the kernel for its blocked tasks (sysrq ``w``).

    >>> print(payload_script(1, False, 120).splitlines()[4])
    /oracle/hmmsim-runner -t 120 /scen/1.hmm; rc=$?
    """
    lines = ["#!/bin/sh", "cd /tmp"]
    if selftest is not None:
        if module:
            lines += [_insmod("/oracle/test_hmm.ko") + f" || {{ echo '{FAIL_MARK} insmod'; exit 3; }}", _MKNODS]
        lines.append("/oracle/hmm-tests" + "".join(" " + shlex.quote(a) for a in selftest))
        return "\n".join(lines) + "\n"
    for i in range(1, nfiles + 1):
        lines.append(f"echo '{FILE_MARK} {i}'")
        lines.append(f"echo '{KMSG_FILE} {i}' > /dev/kmsg")
        if module:
            lines.append(_insmod("/oracle/test_hmm.ko") + f" || {{ echo '{FAIL_MARK} insmod {i}'; exit 3; }}")
            lines.append(_MKNODS.rstrip("\n"))
        lines.append(f"/oracle/hmmsim-runner -t {file_timeout} /scen/{i}.hmm; rc=$?")
        lines.append(f"echo '{RC_MARK} {i}' $rc")
        lines.append("if [ $rc = 7 ]; then [ -w /proc/sysrq-trigger ] && echo w > /proc/sysrq-trigger; "
                     "sleep 1; exit 7; fi")
        if module:
            lines.append(f"rmmod test_hmm || {{ echo '{FAIL_MARK} rmmod {i}'; exit 4; }}")
    return "\n".join(lines) + "\n"


def init_script(module: bool) -> str:
    """``/init``: mounts, the machine settings of the spec's environment (huge zero page
    on, khugepaged asleep with a sentinel mm, proactive compaction off, panic on oops),
    test_hmm's device nodes (built-in test_hmm), then the payload with its output on
    ``/dev/ttyS1``, the end marker, and a reboot (qemu runs with ``-no-reboot``: it exits)."""
    return "\n".join([
        "#!/bin/sh",
        "export PATH=/oracle:/bin:/sbin HOME=/root",
        "mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev 2>/dev/null",
        "mount -t tmpfs tmpfs /tmp",
        "mkdir -p /dev/hugepages /dev/shm",
        "mount -t hugetlbfs hugetlbfs /dev/hugepages 2>/dev/null; mount -t tmpfs tmpfs /dev/shm",
        "T=/sys/kernel/mm/transparent_hugepage",
        "echo 1 > $T/use_zero_page",
        "echo 4294967295 > $T/khugepaged/scan_sleep_millisecs",
        "echo 0 > /proc/sys/vm/compaction_proactiveness 2>/dev/null",
        "echo 1 > /proc/sys/kernel/panic_on_oops",
        # an mm that stays registered with khugepaged (conventions item 24)
        "/oracle/hmmsim-runner --khugepaged-sentinel < /dev/null > /dev/null 2>&1 &",
        "sleep 1",
        "" if module else _MKNODS.rstrip("\n"),
        "stty -F /dev/ttyS1 raw -echo -onlcr 2>/dev/null",
        "sh /oracle/payload.sh > /dev/ttyS1 2>&1; rc=$?",
        f"echo \"{KMSG_END}$rc\" > /dev/kmsg",
        "reboot -f -n",
        "",
    ])


def _dirs(paths: Iterable[str]) -> list[str]:
    out: set[str] = set()
    for p in paths:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            out.add("/".join(parts[:i]))
    return sorted(out)


def make_initramfs(spec: InitramfsSpec) -> bytes:
    """The gzip-compressed initramfs of *spec*."""
    files: dict[str, tuple[int, bytes]] = {
        "init": (0o755, init_script(spec.test_hmm_ko is not None).encode()),
        "bin/busybox": (0o755, spec.busybox.read_bytes()),
        "oracle/hmmsim-runner": (0o755, spec.runner.read_bytes()),
        "oracle/payload.sh": (0o755, payload_script(len(spec.files), spec.test_hmm_ko is not None,
                                                    spec.file_timeout, spec.selftest).encode()),
    }
    if spec.test_hmm_ko is not None:
        files["oracle/test_hmm.ko"] = (0o644, spec.test_hmm_ko.read_bytes())
    if spec.selftest is not None:
        if spec.hmm_tests is None:
            raise FileNotFoundError("the image has no hmm-tests")
        files["oracle/hmm-tests"] = (0o755, spec.hmm_tests.read_bytes())
    for i, f in enumerate(spec.files, 1):
        files[f"scen/{i}.hmm"] = (0o644, Path(f).read_bytes())
    applets = list(spec.applets) or busybox_applets(spec.busybox)
    entries = [CpioEntry(d, stat.S_IFDIR | 0o755)
               for d in sorted({*_dirs(files), "bin", "sbin", "dev", "proc", "sys", "tmp", "root", "scen"})]
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries += [CpioEntry(name, stat.S_IFREG | mode, data) for name, (mode, data) in sorted(files.items())]
    entries += [CpioEntry(f"bin/{a}", stat.S_IFLNK | 0o777, target="busybox") for a in applets
                if f"bin/{a}" not in files]
    return gzip.compress(cpio_newc(entries), compresslevel=1)

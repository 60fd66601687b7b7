"""``hmmsim oracle build``: make a small bootable kernel with test_hmm for the differential tests.

The steps, for ``--kernel 6.12|7.3`` (a Debian release) or ``--kernel PATH`` (a kernel source
tree or tarball of the user's own):

1. **Source.** A release comes from Debian's ``linux-source-X`` package, fetched with
   ``apt-get download`` (nothing is installed). 6.12 is in bookworm-security, 7.3 in
   trixie-backports: a release whose suite the machine's apt does not list is fetched through
   a private sources list in the cache (``apt/sources.list``, with its own package lists under
   ``apt/lists``), so the machine's apt configuration is left as it was.
2. **Config.** ``make tinyconfig``, then :data:`HMM_OPTIONS` appended and ``make
   olddefconfig``; every option is then checked in the resulting ``.config``
   (:func:`options_not_stuck`): option names change between releases, and an option whose
   dependencies are missing is silently dropped by Kconfig.
3. **Build.** ``bzImage`` and ``modules`` (test_hmm.ko), ``make headers`` and the kernel's own
   ``tools/testing/selftests/mm/hmm-tests`` linked static against those headers; the long
   steps show a progress bar (:func:`parse_make_line`).
4. **Cache.** The image directory ``<cache>/kernels/<K>/`` gets ``bzImage``, ``test_hmm.ko``
   (when test_hmm is a module), ``hmm-tests``, ``config`` and ``build.json`` (version, source,
   options that did not stick, date, build time). A second build of a cached version does
   nothing (:func:`image_is_complete`); ``--force`` rebuilds (make is incremental in the
   kept work tree ``<cache>/build/<K>/``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .cache import cache_root

__all__ = (
    "APT_BUILD_DEPS",
    "BUILT_FILES",
    "HMM_OPTIONS",
    "RELEASES",
    "BuildError",
    "Release",
    "Source",
    "add_build_parser",
    "build_kernel",
    "classify_source",
    "cmd_build",
    "config_fragment",
    "image_is_complete",
    "missing_build_deps",
    "options_not_stuck",
    "parse_config",
    "parse_make_line",
    "progress_fraction",
    "release_of_package",
    "tree_version",
)


class BuildError(RuntimeError):
    """A build step failed; the message says which and where its log is."""


@dataclass(frozen=True)
class Release:
    """A kernel release hmmsim knows how to fetch: Debian's ``linux-source-<name>`` package."""

    name: str
    package: str
    suite: str  # the Debian suite that has the package
    mirror: str = "http://deb.debian.org/debian"
    security: bool = False  # the suite lives on the security mirror

    @property
    def sources_line(self) -> str:
        """The one-line apt source for the private sources list."""
        mirror = "http://deb.debian.org/debian-security" if self.security else self.mirror
        return (f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} "
                f"{self.suite} main")


RELEASES: dict[str, Release] = {
    "6.12": Release("6.12", "linux-source-6.12", "bookworm-security", security=True),
    "7.3": Release("7.3", "linux-source-7.3", "trixie-backports"),
}

# What the HMM model needs from a kernel, on top of tinyconfig. Each entry: option, wanted value
# ("y" or "m"), why. test_hmm is a module so a runner can reload it per scenario file (its
# device memory outlives the processes that used it).
HMM_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("64BIT", "y", "x86_64"),
    ("SMP", "y", "the spec's machine has 2 CPUs"),
    ("ACPI", "y", "CPU enumeration and power-off in qemu"),
    ("PCI", "y", "qemu's platform devices"),
    ("PRINTK", "y", "kernel messages"),
    ("BUG", "y", "WARN/BUG reports (tinyconfig drops them)"),
    ("KALLSYMS", "y", "function names in WARN/oops traces"),
    ("EARLY_PRINTK", "y", "early boot messages"),
    ("TTY", "y", "console"),
    ("SERIAL_8250", "y", "serial ports: console and program output"),
    ("SERIAL_8250_CONSOLE", "y", "console on ttyS0"),
    ("BLK_DEV_INITRD", "y", "the runner's initramfs"),
    ("RD_GZIP", "y", "gzip initramfs"),
    ("DEVTMPFS", "y", "/dev"),
    ("PROC_FS", "y", "/proc"),
    ("PROC_SYSCTL", "y", "/proc/sys/vm knobs (6.12's name)"),
    ("SYSCTL", "y", "/proc/sys/vm knobs (7.3's name for PROC_SYSCTL)"),
    ("PROC_PAGE_MONITOR", "y", "/proc/PID/pagemap, smaps"),
    ("SYSFS", "y", "/sys/kernel/mm/transparent_hugepage"),
    ("DEBUG_FS", "y", "gup_test lives in debugfs"),
    ("TMPFS", "y", "/tmp, /dev/shm"),
    ("SHMEM", "y", "shared anonymous memory, memfd"),
    ("MEMFD_CREATE", "y", "memfd_create()"),
    ("BINFMT_ELF", "y", "programs"),
    ("BINFMT_SCRIPT", "y", "#! scripts"),
    ("MULTIUSER", "y", "uids (busybox)"),
    ("FUTEX", "y", "pthreads"),
    ("EPOLL", "y", "busybox"),
    ("EVENTFD", "y", "7.3's hmm-tests userfaultfd_read stops its handler thread with an eventfd"),
    ("POSIX_TIMERS", "y", "timeouts"),
    ("ADVISE_SYSCALLS", "y", "madvise(MADV_HUGEPAGE), the default THP mode is madvise"),
    ("MODULES", "y", "test_hmm as a module"),
    ("MODULE_UNLOAD", "y", "reload test_hmm per scenario file"),
    ("TRANSPARENT_HUGEPAGE", "y", "THP"),
    ("TRANSPARENT_HUGEPAGE_MADVISE", "y", "THP mode madvise by default"),
    ("HUGETLBFS", "y", "hugetlb regions"),
    ("HUGETLB_PAGE", "y", "hugetlb regions"),
    ("SPARSEMEM_VMEMMAP", "y", "ZONE_DEVICE needs it"),
    ("MEMORY_HOTPLUG", "y", "ZONE_DEVICE needs it"),
    ("MEMORY_HOTREMOVE", "y", "ZONE_DEVICE needs it"),
    ("ZONE_DEVICE", "y", "device memory"),
    ("DEVICE_PRIVATE", "y", "device-private pages"),
    ("MIGRATION", "y", "migrate_vma_*"),
    ("COMPACTION", "y", "THP allocation"),
    ("MMU_NOTIFIER", "y", "mirror invalidation"),
    ("HMM_MIRROR", "y", "hmm_range_fault()"),
    ("GUP_TEST", "y", "hmm-tests' gup tests"),
    ("RUNTIME_TESTING_MENU", "y", "test_hmm is in this menu"),
    ("TEST_HMM", "m", "the dmirror test driver"),
    ("USERFAULTFD", "y", "userfaultfd commands"),
    ("PTE_MARKER_UFFD_WP", "y", "uffd write-protect markers"),
)

# Debian packages the build needs beyond a compiler, and a program or file that shows each.
APT_BUILD_DEPS: dict[str, str] = {
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "libelf-dev": "/usr/include/gelf.h",
    "libssl-dev": "/usr/include/openssl/ssl.h",
    "xz-utils": "xz",
    "cpio": "cpio",
    "make": "make",
    "gcc": "gcc",
    "libc6-dev": "/usr/include/stdio.h",
}

_OPTION_RE = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set$")


def config_fragment(options: Iterable[tuple[str, str, str]] = HMM_OPTIONS) -> str:
    """The Kconfig fragment appended to tinyconfig's ``.config`` before ``olddefconfig``."""
    return "".join(f"CONFIG_{name}={value}\n" for name, value, _why in options)


def parse_config(text: str) -> dict[str, str]:
    """A ``.config``'s options: ``{"TEST_HMM": "m", "NUMA": "n", ...}`` ("n" for "is not set")."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _OPTION_RE.match(line):
            out[m.group(1)] = m.group(2).strip('"')
        elif m := _UNSET_RE.match(line):
            out[m.group(1)] = "n"
    return out


def options_not_stuck(config_text: str,
                      options: Iterable[tuple[str, str, str]] = HMM_OPTIONS) -> list[tuple[str, str, str]]:
    """The wanted options that the final ``.config`` does not have as asked.

    Each: ``(option, wanted, got)``; *got* is ``"n"`` when Kconfig turned it off and
    ``"absent"`` when the release has no such option at all (renamed or removed). A module
    asked for and built in (``m`` -> ``y``, forced by something that selects it) counts as
    stuck: the code is there.
    """
    have = parse_config(config_text)
    bad: list[tuple[str, str, str]] = []
    for name, want, _why in options:
        got = have.get(name, "absent")
        if got == want or (want == "m" and got == "y"):
            continue
        bad.append((name, want, got))
    return bad


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class Source:
    """Where a build's kernel source comes from."""

    kind: str  # "release" (a Debian package), "tree" (a directory), "tarball" (a file)
    name: str  # the release name, or the tree/tarball path
    path: Path | None = None

    def describe(self) -> str:
        if self.kind == "release":
            return f"Debian {RELEASES[self.name].package} ({RELEASES[self.name].suite})"
        return f"{self.kind} {self.path}"


_TARBALL_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar.zst")


def classify_source(arg: str) -> Source:
    """What ``--kernel ARG`` names: a known release, a source tree or a tarball.

    A tree is a directory with a top-level ``Makefile`` and ``mm/hmm.c`` (a kernel with HMM); a
    tarball a file whose name ends like a tar archive. Anything else raises
    :class:`BuildError` naming what was expected.
    """
    if arg in RELEASES:
        return Source("release", arg)
    p = Path(arg).expanduser()
    if p.is_dir():
        if (p / "Makefile").is_file() and (p / "mm" / "hmm.c").is_file():
            return Source("tree", str(p.resolve()), p.resolve())
        raise BuildError(f"{arg}: a directory but not a kernel source tree with mm/hmm.c")
    if p.is_file():
        if p.name.endswith(_TARBALL_SUFFIXES) or tarfile.is_tarfile(p):
            return Source("tarball", str(p.resolve()), p.resolve())
        raise BuildError(f"{arg}: not a tar archive")
    raise BuildError(f"{arg}: neither a known release ({', '.join(RELEASES)}) nor a kernel "
                     "source tree or tarball")


def release_of_package(filename: str) -> tuple[str, str] | None:
    """``("7.3", "7.3.4-1~bpo13+1")`` for ``linux-source-7.3_7.3.4-1~bpo13+1_all.deb``."""
    m = re.match(r"^linux-source-([0-9.]+)_([^_]+)_all\.deb$", Path(filename).name)
    return (m.group(1), m.group(2).replace("%3a", ":")) if m else None


_VERSION_RE = re.compile(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)\s*=\s*(\S*)\s*$", re.MULTILINE)


def tree_version(makefile_text: str) -> str:
    """The kernel version a top-level Makefile declares, e.g. ``"7.3.4"`` or ``"6.14.0-rc1"``."""
    v = dict(_VERSION_RE.findall(makefile_text))
    if "VERSION" not in v or "PATCHLEVEL" not in v:
        raise BuildError("the Makefile declares no VERSION/PATCHLEVEL: not a kernel tree")
    base = f"{v['VERSION']}.{v['PATCHLEVEL']}.{v.get('SUBLEVEL') or '0'}"
    return base + v.get("EXTRAVERSION", "")


# ---------------------------------------------------------------------------------------------
# Cache


def _image_dir(name: str, root: Path) -> Path:
    """The image directory of kernel *name* under cache root *root* (``kernels/<name>/``,
    :mod:`hmmsim.oracle.cache`'s layout)."""
    return root / "kernels" / name


#: what a finished build leaves in its image directory (besides test_hmm.ko when it is a module)
BUILT_FILES = ("bzImage", "hmm-tests", "config", "build.json")


def image_is_complete(d: Path) -> bool:
    """Whether *d* holds a finished build: every file of :data:`BUILT_FILES`, the module when
    build.json says test_hmm is one, and a build.json that parses with a version."""
    if not all((d / f).is_file() for f in BUILT_FILES):
        return False
    try:
        meta = json.loads((d / "build.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or not meta.get("version"):
        return False
    return not meta.get("test_hmm_module") or (d / "test_hmm.ko").is_file()


def missing_build_deps(which: Callable[[str], str | None] = shutil.which,
                       exists: Callable[[str], bool] = os.path.exists) -> list[str]:
    """The packages of :data:`APT_BUILD_DEPS` whose program or header is not there."""
    out = []
    for pkg, probe in APT_BUILD_DEPS.items():
        ok = exists(probe) if probe.startswith("/") else which(probe) is not None
        if not ok:
            out.append(pkg)
    return out


# ---------------------------------------------------------------------------------------------
# Progress

_MAKE_LINE_RE = re.compile(r"^\s{2}([A-Z][A-Z0-9_]*(?: \[M\])?)\s+(\S+)")


def parse_make_line(line: str) -> tuple[str, str] | None:
    """``("CC", "mm/hmm.o")`` for kbuild's short output line ``"  CC      mm/hmm.o"``
    (``"LD [M]"`` for module links); None for anything else (warnings, make's own lines)."""
    m = _MAKE_LINE_RE.match(line.rstrip("\n"))
    if not m:
        return None
    return m.group(1), m.group(2)


def progress_fraction(done: int, expected: int | None) -> float | None:
    """How far a step is, from the lines seen so far and the line count of the last build
    of the same tree (None when there was none: the bar then only counts)."""
    if not expected:
        return None
    return min(done / expected, 0.99)


# ---------------------------------------------------------------------------------------------
# The steps


Runner = Callable[..., subprocess.CompletedProcess]


@dataclass
class _Build:
    """One build: where things go and how to report."""

    source: Source
    name: str
    root: Path
    jobs: int
    say: Callable[[str], None]
    log_dir: Path
    steps: dict[str, float] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.root / "build" / self.name

    @property
    def image(self) -> Path:
        return _image_dir(self.name, self.root)

    def run(self, step: str, argv: Sequence[str], cwd: Path, *, progress: bool = False,
            env: dict[str, str] | None = None) -> None:
        """Run one step, its output in ``<work>/logs/<step>.log``; a failure raises
        :class:`BuildError` with the log's tail."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{step}.log"
        count_file = self.log_dir / f"{step}.lines"
        try:
            expected = int(count_file.read_text())
        except (OSError, ValueError):
            expected = None
        t0 = time.monotonic()
        full_env = {**os.environ, **(env or {})}
        with log.open("w") as fh:
            proc = subprocess.Popen(list(argv), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env=full_env)
            assert proc.stdout is not None
            n = 0
            if progress:
                n = _show_progress(step, proc.stdout, fh, expected)
            else:
                for line in proc.stdout:
                    fh.write(line)
            rc = proc.wait()
        self.steps[step] = round(time.monotonic() - t0, 1)
        if rc != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            raise BuildError(f"{step} failed (exit {rc}); log {log}:\n{tail}")
        if progress and n:  # the largest count seen: a full build, not the last incremental one
            count_file.write_text(str(max(n, expected or 0)))


def _show_progress(step: str, stream: Iterable[str], fh, expected: int | None) -> int:
    """Copy *stream* to *fh* while a rich progress bar counts kbuild's lines."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    n = 0
    if not sys.stderr.isatty():  # a log, not a terminal: a line now and then
        for line in stream:
            fh.write(line)
            if parse_make_line(line) is not None:
                n += 1
                if n % 250 == 0:
                    frac = progress_fraction(n, expected)
                    pct = f" ({frac:.0%})" if frac is not None else ""
                    print(f"  {step}: {n} steps{pct}", file=sys.stderr, flush=True)
        return n
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[what]}"),
                  TimeElapsedColumn(), transient=True,
                  console=Console(stderr=True)) as bar:
        task = bar.add_task(step, total=expected, what="")
        for line in stream:
            fh.write(line)
            parsed = parse_make_line(line)
            if parsed is None:
                continue
            n += 1
            bar.update(task, completed=n if expected is None else min(n, expected - 1),
                       what=f"{parsed[0]} {parsed[1]}"[-48:])
    return n


def _apt_private(root: Path, rel: Release) -> list[str]:
    """apt options for a private sources list holding just *rel*'s suite (the machine's apt
    configuration and package lists are not touched)."""
    d = root / "apt"
    (d / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (d / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (d / "sources.list").write_text(rel.sources_line + "\n")
    opts = ["-o", f"Dir::Etc::SourceList={d / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={d / 'lists'}", "-o", f"Dir::Cache={d}"]
    if os.geteuid() == 0:  # root's apt would drop to _apt, which cannot write into a user's cache
        opts += ["-o", "APT::Sandbox::User=root"]
    return opts


def _fetch_release(b: _Build, rel: Release) -> Path:
    """``apt-get download`` of the release's package into ``<cache>/src`` (reused if there)."""
    src = b.root / "src"
    src.mkdir(parents=True, exist_ok=True)
    have = sorted(src.glob(f"{rel.package}_*_all.deb"))
    if have:
        return have[-1]
    if shutil.which("apt-get") is None:
        raise BuildError(f"no apt-get: download {rel.package} from Debian's {rel.suite} yourself "
                         "and give its linux-source tarball as --kernel PATH")
    policy = subprocess.run(["apt-cache", "policy", rel.package], capture_output=True, text=True, check=False)
    opts: list[str] = []
    if "Candidate:" not in policy.stdout or "Candidate: (none)" in policy.stdout:
        b.say(f"{rel.package} is not in this machine's apt suites: using a private sources list "
              f"for {rel.suite} under {b.root / 'apt'}")
        opts = _apt_private(b.root, rel)
        b.run("apt-update", ["apt-get", "-q", *opts, "update"], src)
    b.say(f"downloading {rel.package} ...")
    b.run("apt-download", ["apt-get", "-q", *opts, "download", rel.package], src)
    have = sorted(src.glob(f"{rel.package}_*_all.deb"))
    if not have:
        raise BuildError(f"apt-get download {rel.package} left no package in {src}")
    return have[-1]


def _unpack(b: _Build, archive: Path, is_deb: bool) -> Path:
    """The source tree of *archive* under the work dir (unpacked once)."""
    tree = b.work / "linux"
    if (tree / "Makefile").is_file():
        return tree
    tmp = b.work / "unpack"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if is_deb:
        b.run("unpack-deb", ["dpkg-deb", "-x", str(archive), str(tmp / "deb")], b.work)
        inner = sorted((tmp / "deb" / "usr" / "src").glob("linux-source-*.tar.*"))
        if not inner:
            raise BuildError(f"{archive.name} holds no linux-source tarball")
        archive = inner[0]
    b.say(f"unpacking {archive.name} ...")
    b.run("unpack", ["tar", "-xf", str(archive), "-C", str(tmp)], b.work)
    tops = [p for p in tmp.iterdir() if p.is_dir() and (p / "Makefile").is_file()]
    if len(tops) != 1:
        raise BuildError(f"{archive.name}: expected one top directory with a Makefile, found {len(tops)}")
    tops[0].rename(tree)
    shutil.rmtree(tmp, ignore_errors=True)
    return tree


def _configure(b: _Build, tree: Path, obj: list[str], objdir: Path) -> tuple[str, list[tuple[str, str, str]]]:
    """tinyconfig + :data:`HMM_OPTIONS` + olddefconfig; the final config and what did not stick."""
    b.say("configuring: tinyconfig + the HMM options")
    cfg = objdir / ".config"
    before = (cfg.read_text(), cfg.stat()) if cfg.is_file() else None
    b.run("tinyconfig", ["make", *obj, "tinyconfig"], tree)
    cfg.write_text(cfg.read_text() + config_fragment())
    b.run("olddefconfig", ["make", *obj, "olddefconfig"], tree)
    text = cfg.read_text()
    if before is not None and before[0] == text:
        # the same config as the last build: keep its time so make does not resync it
        os.utime(cfg, ns=(before[1].st_atime_ns, before[1].st_mtime_ns))
    return text, options_not_stuck(text)


def _install_deps(b: _Build) -> None:
    missing = missing_build_deps()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BuildError(f"missing build dependencies: {' '.join(missing)} (install them, e.g. "
                         f"sudo apt-get install {' '.join(missing)})")
    b.say(f"installing build dependencies: {' '.join(missing)}")
    b.run("apt-install", ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], b.root,
          env={"DEBIAN_FRONTEND": "noninteractive"})


def _fingerprint(src: Source) -> str:
    """What identifies a tarball's content cheaply (path, size, mtime); a release: its name."""
    if src.kind == "tarball" and src.path is not None:
        st = src.path.stat()
        return f"{src.path}:{st.st_size}:{int(st.st_mtime)}"
    return src.name


def _name_for(src: Source) -> str:
    if src.kind == "release":
        return src.name
    assert src.path is not None
    if src.kind == "tree":
        return tree_version((src.path / "Makefile").read_text())
    stem = src.path.name
    for suf in _TARBALL_SUFFIXES:
        if stem.endswith(suf):
            stem = stem[: -len(suf)]
            break
    return stem


def build_kernel(kernel: str, *, name: str | None = None, force: bool = False, jobs: int = 2,
                 root: Path | None = None, say: Callable[[str], None] = print, nice: int = 10) -> Path:
    """Build (or find in the cache) the image for ``--kernel`` *kernel*; returns its directory.

    A release or tarball whose image is complete in the cache is returned as it is unless
    *force*; a source tree is always re-made (incrementally: the user is iterating on it).
    """
    src = classify_source(kernel)
    root = root or cache_root()
    name = name or _name_for(src)
    b = _Build(src, name, root, jobs, say, root / "build" / name / "logs")
    img = b.image
    if not force and src.kind != "tree" and image_is_complete(img):
        meta = json.loads((img / "build.json").read_text())
        if meta.get("fingerprint", _fingerprint(src)) == _fingerprint(src):
            say(f"{name}: cached in {img} (Linux {meta['version']}); --force rebuilds")
            return img
    t0 = time.monotonic()
    b.work.mkdir(parents=True, exist_ok=True)
    _install_deps(b)
    deb = None
    if src.kind == "release":
        deb = _fetch_release(b, RELEASES[src.name])
        tree = _unpack(b, deb, is_deb=True)
    elif src.kind == "tarball":
        assert src.path is not None
        tree = _unpack(b, src.path, is_deb=False)
    else:
        assert src.path is not None
        tree = src.path
    # a user's tree is built out of tree (nothing written into it but the selftests'
    # local_config.*); an unpacked one in place
    objdir = b.work / "obj" if src.kind == "tree" else tree
    obj = [f"O={objdir}"] if src.kind == "tree" else []
    objdir.mkdir(parents=True, exist_ok=True)
    config, not_stuck = _configure(b, tree, obj, objdir)
    for opt, want, got in not_stuck:
        say(f"  CONFIG_{opt}: wanted {want}, got {got}")
    if any(o in ("ZONE_DEVICE", "DEVICE_PRIVATE", "TEST_HMM", "HMM_MIRROR") for o, _w, _g in not_stuck):
        raise BuildError("the kernel cannot run test_hmm without the options above")
    nice_cmd = ["nice", "-n", str(nice)] if nice and shutil.which("nice") else []
    module = parse_config(config).get("TEST_HMM") == "m"
    b.run("kernel", [*nice_cmd, "make", *obj, f"-j{jobs}", "bzImage", *(["modules"] if module else [])],
          tree, progress=True)
    b.run("headers", [*nice_cmd, "make", *obj, "headers"], tree, progress=True)
    out = b.work / "selftests"
    out.mkdir(parents=True, exist_ok=True)
    b.run("hmm-tests", [*nice_cmd, "make", "-C", "tools/testing/selftests/mm", f"OUTPUT={out}",
                        f"KHDR_INCLUDES=-isystem {objdir / 'usr' / 'include'}", "LDFLAGS=-static",
                        f"{out}/hmm-tests"], tree)
    version = subprocess.run(["make", "-s", *obj, "kernelrelease"], cwd=tree, capture_output=True,
                             text=True, check=False).stdout.strip() or _name_for(src)
    # install: into a fresh directory, then renamed over the old image (never half an image)
    tmp = img.with_name(img.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(objdir / "arch" / "x86" / "boot" / "bzImage", tmp / "bzImage")
    if module:
        shutil.copy2(objdir / "lib" / "test_hmm.ko", tmp / "test_hmm.ko")
    shutil.copy2(out / "hmm-tests", tmp / "hmm-tests")
    (tmp / "config").write_text(config)
    meta = {
        "name": name,
        "version": version,
        "source": {"kind": src.kind, "what": src.describe(), "package": deb.name if deb else None},
        "fingerprint": _fingerprint(src),
        "options": {o: w for o, w, _why in HMM_OPTIONS},
        "not_stuck": [{"option": o, "wanted": w, "got": g} for o, w, g in not_stuck],
        "test_hmm_module": module,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - t0, 1),
        "step_seconds": b.steps,
    }
    (tmp / "build.json").write_text(json.dumps(meta, indent=2) + "\n")
    if img.exists():
        shutil.rmtree(img)
    tmp.rename(img)
    say(f"{name}: Linux {version} in {img} ({meta['build_seconds']:.0f} s)")
    return img


def add_build_parser(osub: argparse._SubParsersAction) -> None:
    """``hmmsim oracle build``'s arguments (added to the ``oracle`` subcommands)."""
    p = osub.add_parser("build", help="build a small bootable kernel with test_hmm (cached per version)")
    p.add_argument("--kernel", required=True, metavar="6.12|7.3|PATH",
                   help="a Debian release (linux-source-X) or your kernel source tree / tarball")
    p.add_argument("--name", default=None,
                   help="the image's name in the cache (default: the release, or the tree's version)")
    p.add_argument("--force", action="store_true", help="rebuild even if the image is cached")
    p.add_argument("-j", "--jobs", type=int, default=min(os.cpu_count() or 2, 8))
    p.add_argument("--nice", type=int, default=10, help="niceness of the compile steps (default 10; 0: none)")


def cmd_build(args: argparse.Namespace) -> int:
    """Run ``hmmsim oracle build``; 0 when the image is there, 1 on a build failure."""
    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        img = build_kernel(args.kernel, name=args.name, force=args.force, jobs=args.jobs, say=say, nice=args.nice)
    except BuildError as e:
        print(f"hmmsim oracle build: {e}", file=sys.stderr)
        return 1
    meta = json.loads((img / "build.json").read_text())
    bad = meta.get("not_stuck") or []
    print(f"{img}  Linux {meta['version']}  ({meta['source']['what']})")
    print("options that did not stick: " + (", ".join(
        f"CONFIG_{b['option']} (wanted {b['wanted']}, got {b['got']})" for b in bad) or "none"))
    return 0

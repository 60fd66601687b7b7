"""``hmmsim oracle run`` and the C scenario runner, without booting a kernel: the image
cache, the initramfs and its scripts, reading recorded boots (console and payload output
of real 6.12/7.3 boots in ``data/boot_*``), exit codes, and the runner compiled with gcc
(usage, parse errors, its parser against hmmsim's, CPU/file scenarios on this machine's
kernel). One test behind the ``kernel`` marker boots an image."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from hmmsim.cli import main
from hmmsim.oracle import run as oracle_run
from hmmsim.oracle.backend import ORACLE_RUN, KernelRunner, find_runner
from hmmsim.oracle.cache import KernelImage, cache_root, find_image, image_dir, list_images
from hmmsim.oracle.console import parse_console, parse_program
from hmmsim.oracle.initramfs import (
    CpioEntry,
    InitramfsSpec,
    cpio_newc,
    init_script,
    make_initramfs,
    payload_script,
)
from hmmsim.oracle.results import parse_kernel_run
from hmmsim.scenario.parse import Fork, ScenarioParseError, parse_scenario
from hmmsim.scenario.run import run_scenario_text

DATA = Path(__file__).parent / "data"
SCENARIOS = Path(__file__).parents[1] / "scenario"


# -- the image cache -------------------------------------------------------------------------------

def test_cache_root_follows_hmmsim_cache_then_xdg_then_home() -> None:
    env = {"HMMSIM_CACHE": "/c", "XDG_CACHE_HOME": "/x", "HOME": "/h"}
    assert cache_root(env) == Path("/c")
    assert cache_root({**env, "HMMSIM_CACHE": ""}) == Path("/x/hmmsim")
    assert cache_root({"HOME": "/h"}) == Path("/h/.cache/hmmsim")
    assert image_dir("6.12", env) == Path("/c/kernels/6.12")
    with pytest.raises(ValueError):
        image_dir("../7.3", env)


def test_images_are_found_by_release_with_their_optional_files(tmp_path: Path) -> None:
    env = {"HMMSIM_CACHE": str(tmp_path)}
    assert find_image("7.3", env) is None and list_images(env) == []
    d = image_dir("7.3", env)
    d.mkdir(parents=True)
    (d / "hmm-tests").write_bytes(b"x")
    assert find_image("7.3", env) is None  # no bzImage: not an image
    (d / "bzImage").write_bytes(b"k")
    (d / "test_hmm.ko").write_bytes(b"m")
    img = find_image("7.3", env)
    assert img is not None and img.bzimage == d / "bzImage" and img.test_hmm_ko == d / "test_hmm.ko"
    assert img.hmm_tests == d / "hmm-tests" and img.runner is None and img.config is None
    assert list_images(env) == ["7.3"]
    with pytest.raises(FileNotFoundError):
        KernelImage.at(tmp_path)


# -- initramfs -------------------------------------------------------------------------------------

def read_cpio(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, body, (rdev major, minor)) of a newc archive (an independent reader)."""
    out = {}
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos:pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body, (rmaj, rmin))


def test_cpio_newc_holds_files_dirs_links_and_devices() -> None:
    arc = cpio_newc([CpioEntry("bin", stat.S_IFDIR | 0o755), CpioEntry("bin/busybox", stat.S_IFREG | 0o755, b"BB"),
                     CpioEntry("bin/sh", stat.S_IFLNK | 0o777, target="busybox"),
                     CpioEntry("/dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))])
    got = read_cpio(arc)
    assert got["bin/busybox"] == (stat.S_IFREG | 0o755, b"BB", (0, 0))
    assert got["bin/sh"][1] == b"busybox" and stat.S_ISLNK(got["bin/sh"][0])
    assert stat.S_ISCHR(got["dev/console"][0]) and got["dev/console"][2] == (5, 1)
    assert len(arc) % 4 == 0
    if shutil.which("cpio"):  # the real tool reads it too
        res = subprocess.run(["cpio", "-t", "--quiet"], input=arc, capture_output=True, check=True)
        assert res.stdout.decode().split() == ["bin", "bin/busybox", "bin/sh", "dev/console"]


def test_initramfs_has_the_runner_the_scenarios_and_busybox_applets(tmp_path: Path) -> None:
    runner, bb, ko = tmp_path / "r", tmp_path / "bb", tmp_path / "test_hmm.ko"
    runner.write_bytes(b"RUNNER")
    bb.write_bytes(b"BUSYBOX")
    ko.write_bytes(b"KO")
    s1, s2 = tmp_path / "a.hmm", tmp_path / "b.hmm"
    s1.write_text("hmmsim-scenario 1\n")
    s2.write_text("hmmsim-scenario 1\nopen d 0\n")
    spec = InitramfsSpec(runner=runner, busybox=bb, files=[s1, s2], test_hmm_ko=ko, applets=["sh", "insmod", "mount"])
    got = read_cpio(gzip.decompress(make_initramfs(spec)))
    assert got["oracle/hmmsim-runner"][1] == b"RUNNER" and got["bin/busybox"][1] == b"BUSYBOX"
    assert got["oracle/test_hmm.ko"][1] == b"KO" and "oracle/hmm-tests" not in got
    assert got["scen/1.hmm"][1] == s1.read_bytes() and got["scen/2.hmm"][1] == s2.read_bytes()
    assert {n for n in got if n.startswith("bin/")} == {"bin/busybox", "bin/sh", "bin/insmod", "bin/mount"}
    assert got["init"][0] & 0o111 and got["init"][1].startswith(b"#!/bin/sh\n")
    assert b"/scen/2.hmm" in got["oracle/payload.sh"][1]
    assert stat.S_ISCHR(got["dev/console"][0])
    with pytest.raises(FileNotFoundError):  # --selftest needs the image's hmm-tests
        make_initramfs(InitramfsSpec(runner=runner, busybox=bb, selftest=[], applets=["sh"]))


def test_payload_loads_test_hmm_afresh_for_every_file_when_it_is_a_module() -> None:
    mod = payload_script(2, module=True, file_timeout=30)
    assert mod.count("insmod /oracle/test_hmm.ko spm_addr_dev0=0x40000000 spm_addr_dev1=0x50000000") == 2
    assert mod.count("rmmod test_hmm") == 2 and mod.count("hmmsim-runner -t 30 /scen/") == 2
    assert mod.index("@@hmmsim-file 1") < mod.index("/scen/1.hmm") < mod.index("@@hmmsim-rc 1") \
        < mod.index("@@hmmsim-file 2")
    builtin = payload_script(2, module=False, file_timeout=30)
    assert "insmod" not in builtin and "rmmod" not in builtin and "hmmsim-oracle: file 2" in builtin
    st = payload_script(0, module=True, file_timeout=30, selftest=["-r", "hmm.hmm_device_private.open_close"])
    assert st.count("insmod /oracle/test_hmm.ko") == 1 and st.rstrip().endswith("/oracle/hmm-tests -r hmm.hmm_device_private.open_close")


def test_init_sets_up_the_machine_of_the_spec() -> None:
    text = init_script(module=True)
    for setting in ("echo 1 > $T/use_zero_page", "echo 4294967295 > $T/khugepaged/scan_sleep_millisecs",
                    "echo 0 > /proc/sys/vm/compaction_proactiveness", "echo 1 > /proc/sys/kernel/panic_on_oops",
                    "hmmsim-runner --khugepaged-sentinel", "mount -t hugetlbfs", "> /dev/ttyS1",
                    "hmmsim-oracle: end rc=", "reboot -f"):
        assert setting in text
    assert "mknod" not in text and "mknod" in init_script(module=False)  # built-in test_hmm: nodes at boot
    line = oracle_run.kernel_cmdline("never", builtin_test_hmm=True)
    assert "transparent_hugepage=never" in line and "hugepages=32" in line and "memmap=512M$0x40000000" in line
    assert "test_hmm.spm_addr_dev1=0x50000000" in line and "panic=-1" in line


def test_qemu_has_two_cpus_2g_and_two_serial_ports(tmp_path: Path) -> None:
    (tmp_path / "bzImage").write_bytes(b"k")
    img = KernelImage.at(tmp_path)
    argv = oracle_run.qemu_argv(img, tmp_path / "i.gz", tmp_path, "madvise", kvm=False)
    assert argv[argv.index("-m") + 1] == "2G" and argv[argv.index("-smp") + 1] == "2"
    assert "tcg,thread=multi" in argv and sum(a == "-serial" for a in argv) == 2 and "-no-reboot" in argv
    assert "test_hmm.spm_addr_dev0" in argv[argv.index("-append") + 1]  # no test_hmm.ko: built in
    assert "kvm" in oracle_run.qemu_argv(img, tmp_path / "i.gz", tmp_path, "madvise", kvm=True)


# -- recorded boots ---------------------------------------------------------------------------------
# data/boot_NAME/: console.log and program.log of a real boot (`hmmsim oracle run --keep`),
# files.txt (the scenario files, in order), stdout/stderr/status of that run.

BOOTS = sorted(p.name[5:] for p in DATA.glob("boot_*"))


def _boot_dir(name: str) -> Path:
    return DATA / f"boot_{name}"


def _replay(d: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, timed_out: bool = False) -> tuple[int, str, str]:
    """Run ``run_files`` with qemu replaced by the recorded boot in *d*."""

    def fake_qemu(argv: list[str], console: Path, timeout: float, probe: bool,
                  stall: float | None = None) -> oracle_run.QemuEnd:
        work = console.parent
        (work / "console.raw").write_bytes((d / "console.log").read_bytes())
        (work / "program.raw").write_bytes((d / "program.log").read_bytes())
        return oracle_run.QemuEnd(0, timed_out=timed_out)

    monkeypatch.setattr(oracle_run, "_qemu", fake_qemu)
    (tmp_path / "bzImage").write_bytes(b"k")
    runner = tmp_path / "runner"
    runner.write_bytes(b"R")
    monkeypatch.setattr("hmmsim.oracle.initramfs.busybox_applets", lambda bb="": ["sh"])
    files = []
    for n in (d / "files.txt").read_text().split():
        f = tmp_path / n
        f.write_text("hmmsim-scenario 1\n")
        files.append(f)
    out, err = io.StringIO(), io.StringIO()
    status = oracle_run.run_files(KernelImage.at(tmp_path), files, oracle_run.RunOptions(accel="tcg"), runner,
                                  out, err)
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("name", BOOTS)
def test_recorded_boots_replay_to_the_recorded_output_and_status(name: str, monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    d = _boot_dir(name)
    status, out, err = _replay(d, monkeypatch, tmp_path)
    assert status == int((d / "status").read_text())
    assert out == (d / "stdout").read_text()
    assert err == (d / "stderr").read_text()


def test_an_oops_is_a_crash_of_the_file_that_ran(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    status, out, err = _replay(_boot_dir("oops73"), monkeypatch, tmp_path)
    names = (_boot_dir("oops73") / "files.txt").read_text().split()
    assert status == 125
    res = parse_kernel_run(out, err, status, names)
    crashed = [n for n in names if res[n].outcome == "crash"]
    assert crashed == ["devmem_hole_dwrite.hmm"] and res[names[-1]].outcome == "skipped"
    assert any("Oops" in e.message for e in res["devmem_hole_dwrite.hmm"].events)
    assert "while running devmem_hole_dwrite.hmm" in err


def test_a_hang_is_reported_after_the_file_timeout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    status, out, err = _replay(_boot_dir("hang73"), monkeypatch, tmp_path)
    assert status == 125 and "made no progress" in err
    assert '"error":"timeout"' not in out  # the runner's timeout record is the hang, not output
    res = parse_kernel_run(out, err, status, ["thp_coherent_release_split.hmm"])["thp_coherent_release_split.hmm"]
    assert res.outcome == "hang" and res.records[-1]["op"] == "dsnapshot"


def test_a_boot_cut_by_the_timeout_exits_124(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    d = _boot_dir("oops73")
    console = (d / "console.log").read_text()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "console.log").write_text(console[:console.index("hmmsim-oracle: file 2")])
    (cut / "program.log").write_text((d / "program.log").read_text())
    (cut / "files.txt").write_text((d / "files.txt").read_text())
    status, _out, err = _replay(cut, monkeypatch, tmp_path, timed_out=True)
    assert status == 124 and "timeout after 600 s" in err


def test_warnings_are_given_to_the_file_that_ran(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    status, out, err = _replay(_boot_dir("warn612"), monkeypatch, tmp_path)
    names = (_boot_dir("warn612") / "files.txt").read_text().split()
    assert status == 0
    res = parse_kernel_run(out, err, status, names)
    warned = {n for n in names if res[n].outcome == "warn"}
    assert warned == {"devmem_ro_owned_dwrite.hmm"}
    assert all("dmirror_fault" in e.message for e in res["devmem_ro_owned_dwrite.hmm"].events)


def test_console_and_program_parsing_details() -> None:
    rep = parse_console("boot\n[    1.5] hmmsim-oracle: file 1\n[    2.0] BUG: Bad rss-counter state\n"
                        "[    2.1] INFO: task hmmsim-runner:80 blocked for more than 30 seconds.\n")
    assert not rep.ended and [e.file for e in rep.events] == [1, 1] and rep.last_file == 1
    outs, other, fail = parse_program('@@hmmsim-file 1\n{"line":2}\n{"error":"timeout","seconds":9}\n'
                                      '@@hmmsim-rc 1 7\nnoise\n@@hmmsim-file 2\n', 2)
    assert outs[0].timed_out and outs[0].lines == ['{"line":2}'] and outs[1].started and outs[1].rc is None
    assert other == ["noise"] and fail is None
    assert parse_program("@@hmmsim-fail insmod 1\n", 1)[2] == "insmod 1"


def _fake_qemu(tmp_path: Path, lines: list[str], then_sleep: float) -> list[str]:
    """A stand-in for qemu: writes *lines* to the console file qemu_argv names, then sleeps."""
    script = ("import sys, time\nf = open(sys.argv[1], 'w')\n"
              f"for line in {lines!r}:\n    f.write(line + '\\n'); f.flush()\n"
              f"time.sleep({then_sleep})\n")
    return [os.sys.executable, "-c", script, str(tmp_path / "console.raw")]


@pytest.mark.parametrize("lines, sleep, probe, stall, want", [
    (["[0.0] Linux version 7.3", "[1.0] hmmsim-oracle: end rc=0"], 60, False, None, (0, False, False)),  # reboot hangs
    (["[0.0] Linux version 7.3"], 0, False, None, (0, False, False)),  # qemu exits by itself
    (["[0.0] Linux version 7.3"], 60, False, None, (-9, True, False)),  # the whole-boot timeout
    (["[0.0] Linux version 7.3"], 60, False, 1.0, (-9, False, True)),  # no payload output: stalled
    (["SeaBIOS", "Booting from ROM..."], 60, True, None, (None, False, False)),  # KVM never starts the kernel
])
def test_qemu_is_stopped_after_the_end_the_timeout_a_stall_or_a_failed_kvm_start(
        lines: list[str], sleep: float, probe: bool, stall: float | None, want: tuple, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oracle_run, "END_GRACE_SECONDS", 0.5)
    monkeypatch.setattr(oracle_run, "KVM_PROBE_SECONDS", 1.5)
    end = oracle_run._qemu(_fake_qemu(tmp_path, lines, sleep), tmp_path / "console.raw", 3, probe, stall)
    assert (end.rc, end.timed_out, end.stalled) == want


# -- the C runner -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    out = tmp_path_factory.mktemp("runner") / "hmmsim-runner"
    try:
        oracle_run.build_runner(out, static=True)
        assert oracle_run.is_static_elf(out)
    except oracle_run.RunnerBuildError:  # no static libc here
        oracle_run.build_runner(out, static=False)
    return out


def _run(runner: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(runner), *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


def test_runner_compiles_cleanly_with_warnings_on(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    src = oracle_run.runner_source_dir()
    res = subprocess.run(["gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-fsyntax-only",
                          *(str(src / f) for f in oracle_run.RUNNER_SOURCES if f.endswith(".c"))],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0 and res.stderr == ""


def test_runner_usage(runner: Path, tmp_path: Path) -> None:
    res = _run(runner, "--help")
    assert res.returncode == 0 and "usage: hmmsim-runner" in res.stdout
    assert _run(runner).returncode == 2
    assert _run(runner, "--bogus", "x.hmm").returncode == 2
    assert _run(runner, "-t", "0", "x.hmm").returncode == 2
    res = _run(runner, str(tmp_path / "missing.hmm"))
    rec = json.loads(res.stdout)
    assert res.returncode == 2 and (rec["error"], rec["status"]) == ("exit", 2)


def test_runner_parse_errors_and_file_separators(runner: Path, tmp_path: Path) -> None:
    cases = {"empty.hmm": b"", "noheader.hmm": b"# c\n\nopen d 0\n", "bad.hmm": b"hmmsim-scenario 1\nmmap a 1 rw privat,anon\n",
             "fork.hmm": b"hmmsim-scenario 1\nfork\nbogus\n", "nul.hmm": b"hmmsim-scenario 1\n\n# a\0b\n"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    res = _run(runner, *cases, cwd=tmp_path)
    assert res.returncode == 3
    want = []
    for name, data in cases.items():
        want.append({"file": name})
        with pytest.raises(ScenarioParseError) as e:
            parse_scenario(data)
        want.append({"error": "parse", "line": e.value.line})
    assert [json.loads(x) for x in res.stdout.splitlines()] == want
    assert json.loads(_run(runner, "-s", "empty.hmm", cwd=tmp_path).stdout.splitlines()[0]) == {"file": "empty.hmm"}


def _python_parse(data: bytes) -> list[dict]:
    try:
        sc = parse_scenario(data)
    except ScenarioParseError as e:
        return [{"error": "parse", "line": e.line}]
    out: list[dict] = []

    def walk(nodes: tuple) -> None:
        for n in nodes:
            if isinstance(n, Fork):
                out.append({"line": n.line, "op": "fork"})
                walk(n.body)
                out.append({"line": n.end_line, "op": "endfork"})
            else:
                out.append({"line": n.line, "op": n.op, **({"unknown": 1} if n.unknown_name else {})})
    walk(sc.body)
    return out


_TOKENS = [b"fork", b"endfork", b"mmap", b"a", b"b", b"-1", b"0", b"4194304", b"4194305", b"rw", b"none",
           b"private,anon", b"shared,file=f", b"private,dev=d,hugetlb", b"align=512", b"align=3", b"#", b"\r",
           b"\t", b"\x00", b"\xff", b"\xc3\xa9", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"open", b"d", b"close",
           b"dflags", b"1099511627776", b"1099511627777", b"-9223372036854775808", b"-9223372036854775809",
           b"file", b"f", b"mremap", b"dontunmap", b"hmmsim-scenario", b"1", b"uffd", b"dread", b"free", b"9x",
           b"dmigrate_on_fault", b"dread_unlocked"]


def test_runner_parser_agrees_with_hmmsims(runner: Path, tmp_path: Path) -> None:
    """The C parser against scenario/parse.py: the corpus and 300 mutants of it (parse
    error lines, commands, unknown names)."""
    corpus = [p.read_bytes() for p in sorted(SCENARIOS.glob("*/*.hmm"))]
    rnd = random.Random(9)
    cases = list(corpus)
    for _ in range(300):
        d = bytearray(rnd.choice(corpus))
        for _ in range(rnd.randint(1, 3)):
            pos = rnd.randint(0, len(d))
            k = rnd.random()
            if k < 0.5:
                d[pos:pos] = rnd.choice(_TOKENS) + rnd.choice([b" ", b"\n", b""])
            elif k < 0.8:
                del d[pos:pos + rnd.randint(1, 10)]
            else:
                lines = bytes(d).split(b"\n")
                lines.insert(rnd.randrange(len(lines)), rnd.choice(lines))
                d = bytearray(b"\n".join(lines))
        cases.append(bytes(d))
    names = []
    for i, data in enumerate(cases):
        (tmp_path / f"{i}.hmm").write_bytes(data)
        names.append(f"{i}.hmm")
    res = _run(runner, "--parse-only", "-s", *names, cwd=tmp_path)
    got: dict[str, list] = {}
    for line in res.stdout.splitlines():
        rec = json.loads(line)
        if set(rec) == {"file"}:
            cur = got.setdefault(rec["file"], [])
        else:
            cur.append(rec)
    for name, data in zip(names, cases):
        assert got[name] == _python_parse(data), (name, data[:200])


def test_runner_runs_cpu_file_and_fork_scenarios_as_hmmsim_does(runner: Path, tmp_path: Path) -> None:
    """Commands that need no test_hmm, on this machine's kernel: regions, CPU faults, files,
    fork, unknown names; a missing device is -ENODEV."""
    text = """hmmsim-scenario 1
mmap a 8 rw private,anon
fill a 0 8 -5
check a 0 8 -5
read a 2 3
mprotect a 2 2 r
fill a 0 8 3
check a 0 8 3
munmap a 6 1
touch a 4 4
mmap n 4 none private,anon
read n 0 4
file f 3
pwrite f 1 4 77
pread f 0 8
mmap m 5 rw shared,file=f
check m 1 4 77
touch m 0 5
mremap a b 4
check b 0 2 -5
check a 0 1 -5
fork
fill b 0 4 1
check b 0 4 1
fork
mmap c 2 rw private,anon
endfork
endfork
check b 0 4 1
open d 7
dread d a 0 1
dmigrate_on_fault d b 0 1
close d
close d
fork
mmap z 1 rw private,anon
touch q 0 1
endfork
"""
    if any(Path(f"/dev/hmm_dmirror{i}").exists() for i in range(8)):
        pytest.skip("test_hmm is loaded here: the device commands would run")
    (tmp_path / "s.hmm").write_text(text)
    res = _run(runner, "s.hmm", cwd=tmp_path)
    assert res.returncode == 4, res.stderr
    assert res.stdout.splitlines() == run_scenario_text(text)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="no /proc")
def test_runner_skips_unmapped_ranges_quickly(runner: Path, tmp_path: Path) -> None:
    """A CPU command over 4M unmapped pages faults once per VMA gap, not once a page."""
    text = "hmmsim-scenario 1\nmmap a 4194304 none private,anon\nmunmap a 0 4194304\nfill a 0 4194304 1\n" \
           "mmap b 1 rw private,anon\nmremap b c 1\nread b 0 1\n"
    (tmp_path / "s.hmm").write_text(text)
    res = _run(runner, "-t", "30", "s.hmm", cwd=tmp_path)
    assert res.stdout.splitlines() == run_scenario_text(text)


# -- the command line -------------------------------------------------------------------------------

def test_oracle_run_usage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HMMSIM_CACHE", str(tmp_path))
    f = tmp_path / "a.hmm"
    f.write_text("hmmsim-scenario 1\n")
    assert main(["oracle", "run", "--kernel", "7.3", str(f)]) == 2
    assert "hmmsim oracle build --kernel 7.3" in capsys.readouterr().err
    assert main(["oracle", "run", "--image", str(tmp_path), str(f)]) == 2  # no bzImage there
    assert main(["oracle", "run", "--image", str(tmp_path)]) == 2  # no files, no --selftest
    assert main(["oracle", "run", "--image", str(tmp_path), "--selftest", str(f)]) == 2
    assert main(["oracle", "run", "--image", str(tmp_path), str(f), "--", "-r", "x"]) == 2
    assert main(["oracle", "run", "--image", str(tmp_path), str(tmp_path / "none.hmm")]) == 2


def test_oracle_runner_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    out = tmp_path / "bin" / "hmmsim-runner"
    assert main(["oracle", "runner", "--build", "--out", str(out), "--dynamic"]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    assert subprocess.run([str(out), "--help"], capture_output=True, check=False).returncode == 0


def test_compare_and_fuzz_use_oracle_run_when_the_cache_has_the_image(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HMMSIM_CACHE", str(tmp_path))
    monkeypatch.delenv("HMMSIM_KERNEL_RUNNER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no kernel-run on PATH
    assert find_runner(None, "7.3") is None
    image_dir("7.3").mkdir(parents=True)
    (image_dir("7.3") / "bzImage").write_bytes(b"k")
    assert find_runner(None, "7.3") == list(ORACLE_RUN) and find_runner(None, "6.12") is None
    explicit = tmp_path / "kr"
    explicit.write_text("")
    assert find_runner(str(explicit), "7.3") == str(explicit)
    monkeypatch.setenv("HMMSIM_KERNEL_RUNNER", str(explicit))
    assert find_runner(None, "7.3") == str(explicit)


def test_kernel_runner_runs_an_argument_list(tmp_path: Path) -> None:
    """KernelRunner with a command list (how it runs `hmmsim oracle run`): a fake runner
    that prints each file's name as a mmap record and exits 0."""
    fake = tmp_path / "fake.py"
    fake.write_text("import json, os, sys\nfiles = [a for a in sys.argv[1:] if a.endswith('.hmm')]\n"
                    "for f in files:\n    print(json.dumps({'file': os.path.basename(f)}))\n"
                    "    print(json.dumps({'line': 2, 'op': 'mmap', 'ret': 0}))\n")
    res = KernelRunner([os.sys.executable, str(fake)]).run({"a.hmm": "x", "b.hmm": "y"}, "7.3")
    assert {n: (r.outcome, len(r.records)) for n, r in res.items()} == {"a.hmm": ("ok", 1), "b.hmm": ("ok", 1)}


# -- a real boot (deselected by default: pytest -m kernel) -------------------------------------------

@pytest.mark.kernel
@pytest.mark.parametrize("kernel", ["7.3", "6.12"])
def test_boot_runs_a_golden_like_the_real_kernel(kernel: str, tmp_path: Path) -> None:
    """Boot the cached image of *kernel* (or ``$HMMSIM_TEST_IMAGE_<K>``, e.g.
    ``HMMSIM_TEST_IMAGE_7_3=/path/to/image``) and run a golden scenario on it."""
    path = os.environ.get(f"HMMSIM_TEST_IMAGE_{kernel.replace('.', '_')}")
    img = KernelImage.at(path) if path else find_image(kernel)
    if img is None:
        pytest.skip(f"no image of {kernel} (hmmsim oracle build --kernel {kernel})")
    golden = SCENARIOS / "golden" / "device_migrate_private_basic.hmm"
    out, err = io.StringIO(), io.StringIO()
    status = oracle_run.run_files(img, [golden], oracle_run.RunOptions(timeout=300), None, out, err)
    assert status == 0, err.getvalue()
    assert out.getvalue().splitlines() == (golden.parent / kernel / f"{golden.stem}.jsonl").read_text().splitlines()

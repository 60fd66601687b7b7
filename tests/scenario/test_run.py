"""The scenario runner against the real-kernel reference outputs and the conventions
(``spec/scenario-conventions.md``). Invariants are checked after every command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hmmsim.cli import main
from hmmsim.kernel.system import System
from hmmsim.scenario.parse import Command
from hmmsim.kernel.profile import DEFAULT_KERNEL, KERNELS
from hmmsim.scenario.run import reference_config, run_scenario_text

GOLDEN = Path(__file__).parent / "golden"
#: scenarios written while modelling a release difference, with what both real kernels
#: printed (``oracle/kernel-run``): ``recorded/NAME.hmm`` + ``recorded/{6.12,7.3}/NAME.jsonl``
RECORDED = Path(__file__).parent / "recorded"
EXAMPLES = Path(__file__).parents[2] / "examples"


def check(sys: System, cmd: Command) -> None:
    sys.check_invariants(full=True)
    sys.ls.assert_no_locks()


def check_light(sys: System, cmd: Command) -> None:
    """The counters' invariants and no lock held after every command; the full
    (whole-memory, ~30 ms) check runs once at the end (:func:`run_recorded`)."""
    sys.check_invariants(full=False)
    sys.ls.assert_no_locks()


#: the release whose recorded scenarios get the full invariant check after every command;
#: the other release's get it at their end (the full check after every command of all
#: 250 recorded cases is 2 minutes of CPU, more than the whole suite's budget)
FULL_CHECK_KERNEL = "7.3"


def run_recorded(path: Path, kernel: str) -> list[str]:
    """Run a recorded scenario with the invariant checks described above."""
    machine: list[System] = []

    def after(sys: System, cmd: Command) -> None:
        if not machine:
            machine.append(sys)
        (check if kernel == FULL_CHECK_KERNEL else check_light)(sys, cmd)

    got = run_scenario_text(path.read_bytes(), reference_config(kernel), after=after)
    if machine:
        machine[0].check_invariants(full=True)
    return got


def run(text: str, kernel: str = DEFAULT_KERNEL) -> list[dict]:
    return [json.loads(x) for x in run_scenario_text("hmmsim-scenario 1\n" + text,
                                                     reference_config(kernel), after=check)]


def golden_cases(*names: str) -> list:
    """(scenario, kernel) pairs of the recorded real-kernel outputs, by name prefix."""
    return [pytest.param(p, k, id=f"{p.stem}-{k}") for p in sorted(GOLDEN.glob("*.hmm"))
            if p.stem.startswith(names) for k in KERNELS]


def golden_lines(path: Path, kernel: str) -> list[str]:
    return (GOLDEN / kernel / f"{path.stem}.jsonl").read_text().splitlines()


@pytest.mark.parametrize("path, kernel", golden_cases("mirror_", "version_huge_zero_write"))
def test_golden_mirror_scenarios_match_the_real_kernel(path: Path, kernel: str) -> None:
    got = run_scenario_text(path.read_bytes(), reference_config(kernel), after=check)
    assert got == golden_lines(path, kernel)


@pytest.mark.parametrize("path, kernel", [
    pytest.param(p, k, id=f"{p.stem}-{k}") for p in sorted(RECORDED.glob("*.hmm")) for k in KERNELS
    if (RECORDED / k / f"{p.stem}.jsonl").exists()])
def test_recorded_scenarios_match_the_real_kernel(path: Path, kernel: str) -> None:
    got = run_recorded(path, kernel)
    assert got == (RECORDED / kernel / f"{path.stem}.jsonl").read_text().splitlines()


@pytest.mark.parametrize("path, kernel", golden_cases("device_", "version_flags_fail_alloc",
                                                     "version_exclusive_thp", "version_thp_migrate_private"))
def test_golden_device_scenarios_match_the_real_kernel(path: Path, kernel: str) -> None:
    """MIGRATE_TO_DEV / MIGRATE_TO_SYS, CPU faults through migrate_to_ram, snapshots of
    device pages, 7.3's FAIL_ALLOC, device-exclusive access to a THP (6.12's -EBUSY, 7.3's
    per-page entries), a THP migrated whole (7.3) or split (6.12): every line as the real
    kernel printed it."""
    got = run_scenario_text(path.read_bytes(), reference_config(kernel), after=check)
    assert got == golden_lines(path, kernel)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.hmm")), ids=lambda p: p.stem)
def test_examples_run_without_errors(path: Path) -> None:
    out = [json.loads(x) for x in run_scenario_text(path.read_bytes(), after=check)]
    assert out and all("error" not in r for r in out)


def test_parse_error_is_the_only_line() -> None:
    assert run_scenario_text("hmmsim-scenario 1\nmmap a 1 rw private,anon\nbogus\n") == ['{"error":"parse","line":3,"message":"unknown op \'bogus\'"}']


def test_unknown_name_stops_the_scenario_inside_fork() -> None:
    out = run("mmap a 1 rw private,anon\nfork\ntouch b 0 1\nendfork\ntouch a 0 1\n")
    assert out == [{"line": 2, "op": "mmap", "ret": 0}, {"line": 3, "op": "fork", "ret": 0},
                   {"error": "unknown-name", "line": 4, "op": "touch", "proc": 1}]


def test_fork_output_and_depth() -> None:
    out = run("mmap a 1 rw private,anon\nfork\nfill a 0 1 1\nfork\ncheck a 0 1 1\nendfork\nendfork\ncheck a 0 1 1\n")
    assert out == [
        {"line": 2, "op": "mmap", "ret": 0}, {"line": 3, "op": "fork", "ret": 0},
        {"line": 4, "op": "fill", "proc": 1, "ret": 0}, {"line": 5, "op": "fork", "proc": 1, "ret": 0},
        {"line": 6, "mismatch": 0, "op": "check", "proc": 2, "ret": 0},
        {"line": 7, "op": "endfork", "proc": 1, "ret": 0}, {"line": 8, "op": "endfork", "ret": 0},
        {"line": 9, "mismatch": 1024, "op": "check", "ret": 0},
    ]


def test_cpu_commands_report_the_first_faulting_page_and_go_on() -> None:
    out = run("mmap a 4 rw private,anon\nmunmap a 1 1\nfill a 0 6 7\ncheck a 0 1 7\ncheck a 2 2 7\n"
              "read a 3 2\ntouch a 0 0\nread a 0 0\n")
    assert out[2] == {"line": 4, "op": "fill", "page": 1, "ret": "segv"}
    assert out[3]["mismatch"] == 0 and out[4]["mismatch"] == 0, "pages around the hole were filled"
    assert out[5] == {"line": 7, "op": "read", "page": 4, "ret": "segv"}
    assert out[6] == {"line": 8, "op": "touch", "ret": 0} and out[7] == {"crc": 0, "line": 9, "op": "read", "ret": 0}


def test_zero_page_counts() -> None:
    out = run("mmap a 0 rw private,anon\nmmap b 2 rw private,anon\nmunmap b 0 0\nmprotect b 0 0 r\n"
              "madvise b 0 0 dontneed\nopen d 0\ndread d b 0 0\ndsnapshot d b 0 0\n")
    assert [r["ret"] for r in out] == [-22, 0, -22, 0, 0, 0, -22, -22]


def test_regions_run_into_unmapped_memory() -> None:
    out = run("mmap a 4 rw private,anon\nopen d 0\ndsnapshot d a 2 4\ndread d a 0 5\n"
              "mprotect a 0 6 r\nmadvise a 0 6 hugepage\nmunmap a 2 8\nfill a 0 1 1\n")
    assert out[2]["prot"] == "0000ffff"
    assert out[3]["ret"] == -14
    assert out[4]["ret"] == -12 and out[5]["ret"] == -12 and out[6]["ret"] == 0
    assert out[7] == {"line": 9, "op": "fill", "page": 0, "ret": "segv"}, "the mprotect applied before its -ENOMEM"


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_handles_failed_open_and_double_close(kernel: str) -> None:
    """A failed open and a closed handle are -ENODEV / -EBADF for every command; FLAGS
    exists in 7.3 only (6.12's ioctl switch: -EINVAL; value 0 is -EINVAL on both)."""
    out = run("mmap a 1 rw private,anon\nopen d 4\ndread d a 0 1\nopen e 1\nclose e\nclose e\n"
              "dsnapshot e a 0 1\ndflags e 1\nopen f 1\ndflags f 1\ndflags f 0\n", kernel)
    flags = -22 if kernel == "6.12" else 0
    assert [r["ret"] for r in out] == [0, -19, -9, 0, 0, -9, -9, -9, 0, flags, -22]


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_mremap_moves_data_and_refuses_spanning_vmas(kernel: str) -> None:
    """6.12 refuses a range spanning several VMAs (-EFAULT); 7.3's remap_move moves them
    all (``mremap_move_multiple_vmas``), after which b is empty."""
    out = run("mmap a 8 rw private,anon\nfill a 0 8 5\nmremap a b 8\ncheck b 0 8 5\ntouch a 0 1\n"
              "mprotect b 2 2 r\nmremap b c 8\nmremap b d 2\ncheck d 0 2 5\ncheck c 0 8 5\n", kernel)
    assert out[2]["ret"] == 0 and out[3]["mismatch"] == 0
    assert out[4] == {"line": 6, "op": "touch", "page": 0, "ret": "segv"}
    if kernel == "6.12":
        assert out[6]["ret"] == -14, "a range spanning several VMAs"
        assert out[7]["ret"] == 0 and out[8]["mismatch"] == 0
        assert out[9]["ret"] == "segv"
    else:
        assert out[6]["ret"] == 0
        assert out[7]["ret"] == -14, "b was moved away whole"
        assert out[9]["mismatch"] == 0


def test_mremap_dontunmap_leaves_an_empty_mapping() -> None:
    out = run("mmap a 4 rw private,anon\nfill a 0 4 9\nmremap a b 4 dontunmap\nread a 0 4\ncheck b 0 4 9\n")
    zero_crc = run("mmap z 4 rw private,anon\nread z 0 4\n")[1]["crc"]
    assert out[3]["crc"] == zero_crc and out[4]["mismatch"] == 0


def test_files_pwrite_pread_and_mappings() -> None:
    out = run("file f 4\npwrite f 2 4 11\npread f 0 6\nmmap m 6 rw shared,file=f\ncheck m 2 4 11\n"
              "read m 5 1\nfill m 0 1 12\npread f 0 1\nmmap n 2 r private,file=f,hugetlb\n")
    assert out[1]["ret"] == 0 and out[3]["ret"] == 0 and out[4]["mismatch"] == 0
    assert out[5]["ret"] == 0, "pwrite extended the file to 6 pages"
    assert out[7]["crc"] == run("file g 1\npwrite g 0 1 12\npread g 0 1\n")[2]["crc"]
    assert out[8]["ret"] == -22, "MAP_HUGETLB with a tmpfs file"


def test_overcommit_refuses_a_private_writable_mapping_larger_than_ram() -> None:
    out = run("mmap big 4194304 rw private,anon\nmmap ro 4194304 r private,anon\ntouch ro 0 3\n")
    assert [r["ret"] for r in out] == [-12, 0, 0]


def test_hugetlb_regions_are_2mib_aligned_and_whole_pages() -> None:
    out = run("mmap h 8 rw private,anon,hugetlb\nfill h 0 8 1\nopen d 0\ndsnapshot d h 0 1\ncheck h 8 1 1\n")
    assert out[0]["ret"] == 0 and out[1]["ret"] == 0
    assert out[3]["prot"] == "06", "hugetlb page: WRITE|PMD"
    assert out[4]["ret"] == 0, "the mapping covers the whole 2 MiB page, past the region's 8 pages"


def test_cli_run_prints_file_separators(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = tmp_path / "a.hmm"
    a.write_text("hmmsim-scenario 1\nmmap a 1 rw private,anon\n")
    b = tmp_path / "b.hmm"
    b.write_text("hmmsim-scenario 1\nfork\n")
    assert main(["run", str(a), str(b)]) == 3  # EXIT_STATUS["parse"]
    assert capsys.readouterr().out.splitlines() == [
        '{"file":"a.hmm"}', '{"line":2,"op":"mmap","ret":0}', '{"file":"b.hmm"}',
        '{"error":"parse","line":2,"message":"fork without endfork"}']


def test_cli_selftest_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["selftest", "--json", "-r", "open_close"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in res] == ["pass", "pass"]


def test_run_fork_nesting_uses_no_python_recursion() -> None:
    """Nested forks run from an explicit stack: with the interpreter's recursion limit
    only a little above the current depth, 150 nested forks still run (each level used
    to take two Python frames, so 1200 levels crashed with RecursionError)."""
    import inspect
    import sys as pysys
    depth = 150
    text = ("mmap a 1 rw private,anon\nfill a 0 1 5\n" + "fork\n" * depth + "check a 0 1 5\n"
            + "endfork\n" * depth + "check a 0 1 5\n")
    limit = pysys.getrecursionlimit()
    pysys.setrecursionlimit(len(inspect.stack()) + 120)
    try:
        out = run(text)
    finally:
        pysys.setrecursionlimit(limit)
    assert out[2 + depth] == {"line": 4 + depth, "mismatch": 0, "op": "check", "proc": depth, "ret": 0}
    ends = [r for r in out if r["op"] == "endfork"]
    assert len(ends) == depth and [r.get("proc", 0) for r in ends] == list(range(depth - 1, -1, -1))
    assert out[-1] == {"line": 5 + 2 * depth, "mismatch": 0, "op": "check", "ret": 0}

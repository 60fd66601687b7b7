"""Conventions items 25 and 26: sequences that oops the real kernels are reported as
``{"error":"kernel-oops",...}`` on the very command where the kernel crashes, naming the
path, and nowhere else (the recorded ``devmem_oops_neighbours``, ``devmem_ro_owned_dwrite``
and ``devmem_hole_dwrite`` scenarios are the neighbouring sequences both kernels run)."""

from __future__ import annotations

import json

import pytest

from hmmsim.kernel.profile import KERNELS
from hmmsim.scenario.run import reference_config, run_scenario_text

from .test_run import check

#: item 25: a device READ/WRITE through a private device's handle whose mirror lacks the
#: device's own device-private pages (the range fault stores the device-private page,
#: then test_hmm copies through it): both releases
ITEM_25 = {
    "second_handle": ("open d 0\nopen e 0\nmmap a 4 rw private,anon\nfill a 0 4 1\n"
                      "dmigrate d a 0 4\ndread e a 0 4\n", 7, "dread", "dmirror_do_read"),
    "child_handle": ("open d 0\nmmap a 4 rw private,anon\nfill a 0 4 1\ndmigrate d a 0 4\n"
                     "fork\nopen f 0\ndread f a 0 4\nendfork\n", 8, "dread", "dmirror_do_read"),
    "after_mprotect": ("open d 0\nmmap a 4 rw private,anon\nfill a 0 4 1\ndmigrate d a 0 4\n"
                       "mprotect a 0 4 r\ndread d a 0 4\n", 7, "dread", "dmirror_do_read"),
    "after_neighbour_munmap": ("open d 0\nmmap a 4 rw private,anon\nfill a 0 4 1\n"
                               "dmigrate d a 0 4\nmunmap a 1 1\ndwrite d a 2 2 7\n", 7, "dwrite",
                               "dmirror_do_write"),
    "after_fork_read": ("open d 0\nmmap a 4 rw private,anon\nfill a 0 4 1\ndmigrate d a 0 4\n"
                        "fork\nendfork\ndread d a 0 4\n", 8, "dread", "dmirror_do_read"),
}
#: item 26: a device WRITE to pages migrated from never-touched holes (7.3 only)
ITEM_26 = "open d 0\nmmap a 8 rw private,anon\ndmigrate d a 0 8\ndwrite d a 0 2 4\n"


def run(text: str, kernel: str) -> list[dict]:
    return [json.loads(x) for x in run_scenario_text("hmmsim-scenario 1\n" + text, reference_config(kernel),
                                                     after=check)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", sorted(ITEM_25))
def test_item_25_oops_is_reported_where_the_kernel_crashes(kernel: str, case: str) -> None:
    text, line, op, fn = ITEM_25[case]
    out = run(text, kernel)
    assert all("error" not in r for r in out[:-1])
    last = out[-1]
    assert (last["error"], last["line"], last["op"]) == ("kernel-oops", line, op)
    assert fn in last["message"] and "device-private page" in last["message"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_item_25_same_sequences_on_coherent_devices_run(kernel: str) -> None:
    """Coherent pages are CPU-addressable: the same sequences through devices 2/3 run."""
    for text, _line, _op, _fn in ITEM_25.values():
        out = run(text.replace("open d 0", "open d 2").replace("open e 0", "open e 2")
                  .replace("open f 0", "open f 2"), kernel)
        assert all("error" not in r for r in out), out


def test_item_26_oopses_7_3_only() -> None:
    out = run(ITEM_26, "7.3")
    assert out[-1]["error"] == "kernel-oops" and out[-1]["line"] == 5 and out[-1]["op"] == "dwrite"
    assert "dmirror_do_write" in out[-1]["message"]
    # 6.12 gave the device page the write flag: the device writes through its mirror
    assert run(ITEM_26, "6.12")[-1] == {"cpages": 2, "faults": 0, "line": 5, "op": "dwrite", "ret": 0}
    # with the pages written by the CPU first, 7.3 runs it too
    text = ITEM_26.replace("dmigrate", "fill a 0 8 1\ndmigrate")
    assert run(text, "7.3")[-1] == {"cpages": 2, "faults": 0, "line": 6, "op": "dwrite", "ret": 0}

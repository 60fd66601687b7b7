"""The ``uffd`` scenario command where a real kernel hangs: hmmsim reports it."""

from __future__ import annotations

import json

import pytest

from hmmsim.scenario.run import reference_config, run_scenario_text


@pytest.mark.parametrize("kernel", ["6.12", "7.3"])
def test_a_fault_the_handler_cannot_answer_is_a_kernel_hang(kernel: str) -> None:
    """A hugetlb range registered MISSING: the handler's 4 KiB UFFDIO_COPY is -EINVAL for a
    huge page, so the fault sleeps for ever (the real 7.3 kernel here: no output for the
    line, then the machine times out). hmmsim names who waits for what."""
    text = ("hmmsim-scenario 1\nmmap a 1024 rw private,anon,hugetlb align=512\n"
            "uffd a 0 512 1\ncheck a 0 1 1\n")
    lines = [json.loads(x) for x in run_scenario_text(text, reference_config(kernel))]
    assert lines[:2] == [{"line": 2, "op": "mmap", "ret": 0}, {"line": 3, "op": "uffd", "ret": 0}]
    hang = lines[2]
    assert hang["error"] == "kernel-hang" and hang["line"] == 4 and hang["op"] == "check"
    assert "waits for a userfaultfd reply (handle_userfault)" in hang["message"]
    assert "uffd/" in hang["message"] and "poll(userfaultfd)" in hang["message"]
    assert len(lines) == 3


def test_unaligned_hugetlb_registration_is_einval() -> None:
    text = "hmmsim-scenario 1\nmmap e 4 rw private,anon,hugetlb\nuffd e 0 4 1\n"
    assert json.loads(run_scenario_text(text, reference_config("7.3"))[1])["ret"] == -22

"""Counters (``kernel/stats.py``): a misspelled key raises instead of reading 0, a declared
key never counted reads 0, and every key the code and the docs use is declared."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hmmsim import Process
from hmmsim.drivers.test_hmm_uapi import IOCTL_NAMES
from hmmsim.kernel.mmu_notifier import MmuNotifierEvent
from hmmsim.kernel.page_types import PAGE_SIZE as P
from hmmsim.kernel.stats import (
    COUNTERS, DMIRROR_IOCTLS, LOCK_CLASSES, MMU_NOTIFY_EVENTS, Stats, UnknownCounterError, declare,
)

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "hmmsim"


def test_stats_add_of_undeclared_key_raises_and_counts_nothing() -> None:
    s = Stats()
    with pytest.raises(UnknownCounterError) as ei:
        s.add("fault.do_anonymous_pag")
    assert isinstance(ei.value, KeyError)
    assert ei.value.close_matches[0] == "fault.do_anonymous_page"
    assert "did you mean 'fault.do_anonymous_page'" in str(ei.value)
    assert s.snapshot() == {}


def test_stats_getitem_declared_reads_zero_undeclared_raises() -> None:
    s = Stats()
    assert s["fault.do_cow_fault"] == 0
    s.add("fault.do_cow_fault", 2)
    assert s["fault.do_cow_fault"] == 2 and s.snapshot("fault.") == {"fault.do_cow_fault": 2}
    with pytest.raises(KeyError, match="'dmirror.ioctl.read'"):
        s["dmirror.ioctl.ead"]
    s.reset()
    assert s["fault.do_cow_fault"] == 0 and s.snapshot() == {}


def test_stats_measure_delta_checks_keys() -> None:
    s = Stats()
    with s.measure() as d:
        s.add("walk_page_range")
    assert d["walk_page_range"] == 1 and d["walk.pte_hole"] == 0
    with pytest.raises(UnknownCounterError, match="walk.pte_hole"):
        d["walk.pte_hol"]


def test_stats_key_declared_after_creation() -> None:
    """A key declared after a Stats object exists (a new lock class) is usable on it."""
    s = Stats()
    key = declare("test.late_counter", "declared by this test")
    assert s[key] == 0
    s.add(key, 3)
    assert s[key] == 3


def test_dmirror_ioctl_keys_are_the_command_names(proc: Process) -> None:
    """``dmirror.ioctl.read``/``write``/``snapshot`` (the prefix slice was off by one)."""
    a = proc.mmap(2 * P)
    d = proc.open_device(0)
    with proc.system.stats.measure() as delta:
        d.read(a, 2)
        d.write(a, b"x" * 2 * P)
        d.write(a, b"y" * 2 * P)
        d.snapshot(a, 2)
    assert {k: v for k, v in delta.items() if k.startswith("dmirror.ioctl.")} == {
        "dmirror.ioctl.read": 1, "dmirror.ioctl.write": 2, "dmirror.ioctl.snapshot": 1}


def test_families_match_their_kernel_enums() -> None:
    assert MMU_NOTIFY_EVENTS == tuple(e.name.removeprefix("MMU_NOTIFY_") for e in MmuNotifierEvent)
    assert set(DMIRROR_IOCTLS) == {n.removeprefix("HMM_DMIRROR_").lower() for n in IOCTL_NAMES.values()} | {"unknown"}


def _literal_keys_in_src() -> set[str]:
    keys: set[str] = set()
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        keys |= set(re.findall(r"\b(?:stats|st)\.add\(\s*\"([^\"{}]+)\"", text))
        keys |= set(re.findall(r"_account\([^)]*\"([^\"{}]+)\"\)", text))
    return keys


def test_every_key_counted_in_src_is_declared() -> None:
    keys = _literal_keys_in_src()
    assert len(keys) > 60, "the scan finds the counting sites"
    assert sorted(k for k in keys if k not in COUNTERS) == []


def test_every_lock_class_in_src_is_declared() -> None:
    """Lock classes taken by identity (``acquire(ident, "klass", ...)``) must be declared
    ahead; classes of Lock objects are declared when the Lock is created."""
    classes: set[str] = set()
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        classes |= set(re.findall(r"\.acquire\([^,]+,\s*\"([a-z_]+)\"", text))
        classes |= set(re.findall(r"\bLock\([^,]+,\s*\"([a-z_]+)\"", text))
    assert classes and classes <= set(LOCK_CLASSES)
    for k in LOCK_CLASSES:
        assert f"lock.{k}.read" in COUNTERS and f"lock.{k}.write" in COUNTERS


def test_every_key_read_in_tests_and_docs_is_declared() -> None:
    """Keys read as ``d["..."]``/``stats["..."]`` in the tests and the README are declared."""
    pat = re.compile(r"\b(?:d|delta|stats|s|st)\[\"([a-z_]+(?:\.[a-z_0-9A-Z]+)+|walk_page_range)\"\]")
    keys: set[str] = set()
    for path in [*(ROOT / "tests").rglob("*.py"), ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        if path.resolve() != Path(__file__).resolve():   # this file misspells keys on purpose
            keys |= set(pat.findall(path.read_text()))
    assert "lock.mmap_lock.read" in keys, "the README example is scanned"
    assert sorted(k for k in keys if k not in COUNTERS) == []


def test_stats_save_restore_undoes_an_attempt() -> None:
    s = Stats()
    s.add("fault.do_anonymous_page", 2)
    full = s.save()
    part = s.save(["fault.do_anonymous_page"])
    s.add("fault.do_anonymous_page", 5)
    s.add("fault.do_wp_page")
    s.restore(part)
    assert s["fault.do_anonymous_page"] == 2 and s["fault.do_wp_page"] == 1
    s.restore(full)
    assert s["fault.do_anonymous_page"] == 2 and s["fault.do_wp_page"] == 0

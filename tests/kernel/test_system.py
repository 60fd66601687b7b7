"""Booting a :class:`System`: configuration checks, the test_hmm module, processes."""

from __future__ import annotations

import pytest

from hmmsim import System, SystemConfig
from hmmsim.kernel.module import load_module
from hmmsim.kernel.system import System as KernelSystem

MiB = 1 << 20


@pytest.mark.parametrize("overrides, message", [
    ({"thp": "sometimes"}, "THP mode"),
    ({"ram": 32 * MiB}, "at least 64 MiB"),
    ({"ram": 65 * MiB}, "multiple of 2 MiB"),
    ({"hugetlb_pages": -1}, "hugetlb pool"),
    ({"ram": 128 * MiB, "hugetlb_pages": 33}, "hugetlb pool"),
    ({"swap_pages": -1}, "swap_pages"),
    ({"kernel": "5.15"}, "not modelled"),
])
def test_bad_config_is_rejected_with_a_clear_error(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SystemConfig(**overrides)


def test_config_and_overrides_are_exclusive() -> None:
    with pytest.raises(TypeError):
        System(SystemConfig(), thp="always")


def test_boot_loads_test_hmm_with_four_devices() -> None:
    sys = System(ram=256 * MiB)
    assert sys.modules_loaded == ["test_hmm"]
    assert [d.is_private for d in sys.dmirror_devices] == [True, True, False, False]
    # each device has its first chunk: a pagemap of the right kind
    assert [pg.is_private for pg in sys.pgmaps] == [True, True, False, False]
    sys.check_invariants()


def test_boot_without_coherent_memory_has_two_devices() -> None:
    sys = System(ram=256 * MiB, coherent=False)
    assert [d.is_private for d in sys.dmirror_devices] == [True, True]


def test_boot_without_test_hmm_has_no_devices() -> None:
    sys = System(ram=256 * MiB, test_hmm=False)
    assert sys.modules_loaded == [] and sys.dmirror_devices == [] and sys.pgmaps == []


def test_unknown_module_is_rejected_and_changes_nothing() -> None:
    sys = System(ram=256 * MiB, test_hmm=False)
    with pytest.raises(ValueError, match="no module 'nouveau'"):
        load_module(sys, "nouveau")
    assert sys.modules_loaded == []


def test_kernel_system_has_tasks_the_facade_adds_spawn() -> None:
    ksys = KernelSystem(ram=256 * MiB, test_hmm=False)
    t = ksys.create_task("a.out")
    assert ksys.tasks == [t] and t.name == "a.out" and t.mm.vma_list() == []
    assert not hasattr(ksys, "spawn")
    p = System(ram=256 * MiB, test_hmm=False).spawn("b.out")
    assert p.task.name == "b.out"

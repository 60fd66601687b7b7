"""The runner's device-command buffer (conventions item 19): its pages are not cleared
when they are allocated, since a successful command overwrites every byte before the
runner reads them, and are cleared when the command fails; the machine ends exactly as
if every page had been cleared at allocation (frames, their bytes and flags, counters)."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest

from hmmsim.kernel.physmem import PG_data, PhysMem
from hmmsim.scenario.parse import parse_scenario
from hmmsim.scenario.run import dumps, reference_config, run_scenario

#: dirty frames first (a region written then unmapped), then device commands that succeed
#: and fail (a hole, an unmapped region, pages not on the device) over them
SCENARIO = b"""hmmsim-scenario 1
open d 0
mmap x 3000 rw private,anon
fill x 0 3000 5
munmap x 0 3000
mmap a 1200 rw private,anon
fill a 0 1200 7
dread d a 0 1200
munmap a 600 10
dread d a 0 1200
dmigrate d a 0 600
dexclusive d a 0 600
dmigrate d a 610 590
dmigrate_sys d a 0 600
dwrite d a 0 600 9
dwrite d a 0 1200 9
mmap b 700 rw private,anon
dread d b 0 700
dmigrate d b 0 700
dmigrate d a 0 1200
dmigrate_on_fault d a 0 600
munmap b 0 700
dread d b 0 700
dexclusive d b 0 700
check a 0 600 9
"""


def run(monkeypatch: pytest.MonkeyPatch, clear_at_alloc: bool) -> tuple[list[str], tuple, dict]:
    if clear_at_alloc:  # the reference: every allocation clears its frames
        monkeypatch.setattr(PhysMem, "overwritten", lambda self: nullcontext())
    lines: list[str] = []
    s = run_scenario(parse_scenario(SCENARIO), lambda r: lines.append(dumps(r)), reference_config())
    monkeypatch.undo()
    m = s.mem
    s.check_invariants(full=True)
    written = np.flatnonzero(m.flags[:m.data_pages] & PG_data)
    state = tuple(a.tobytes() for a in (m.flags, m.refcount, m.mapcount, m.order, m._free))
    return lines, state + (m.data[written].tobytes(),), s.stats.snapshot()


def test_buffer_pages_end_as_if_cleared_at_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    got = run(monkeypatch, False)
    want = run(monkeypatch, True)
    assert got == want
    rets = [line for line in got[0] if '"ret":0' not in line]
    assert len(rets) >= 4, "some commands fail"


def test_no_clearing_skipped_with_scheduling_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a simulated thread's hooks (something else may run during the command) the
    buffer is cleared at allocation as usual."""
    seen: list[bool] = []
    orig = PhysMem._take

    def take(self: PhysMem, pfns, zero=True, at=None):  # noqa: ANN001, ANN202
        seen.append(self.skip_clear)
        return orig(self, pfns, zero, at)

    monkeypatch.setattr(PhysMem, "_take", take)
    run_scenario(parse_scenario(b"hmmsim-scenario 1\nopen d 0\nmmap a 8 rw private,anon\ndread d a 0 8\n"),
                 lambda r: None, reference_config())
    assert True in seen
    seen.clear()
    from hmmsim.kernel.locking import LockState
    monkeypatch.setattr(LockState, "has_hooks", property(lambda self: True), raising=False)
    run_scenario(parse_scenario(b"hmmsim-scenario 1\nopen d 0\nmmap a 8 rw private,anon\ndread d a 0 8\n"),
                 lambda r: None, reference_config())
    assert seen and True not in seen

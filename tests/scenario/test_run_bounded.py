"""Work bounded by what exists: commands far past a region (recorded on both kernels in
``recorded/past_end_*.hmm``; the recorded scenarios of the device windows and of the
memory the device buffers take, ``dmirror_window_*`` and ``oom_*``, run in
``test_run.py``) return at once."""

from __future__ import annotations

import time

from hmmsim.scenario.run import run_scenario_text


def test_commands_far_past_a_region_return_quickly() -> None:
    """Work is bounded by what is mapped: 2^22-page commands on a one-page region neither
    allocate memory for 16 GiB nor visit every page."""
    text = "\n".join(["hmmsim-scenario 1", "open d 0", "mmap a 1 rw private,anon", "fill a 0 1 3",
                      "dwrite d a 0 4194304 1", "dread d a 0 4194304", "dsnapshot d a 0 4194304",
                      "dcheck_exclusive d a 0 4194304", "check a 0 4194304 3", "fill a 0 4194304 3",
                      "read a 0 4194304", "touch a 0 4194304", ""])
    t0 = time.perf_counter()
    got = run_scenario_text(text)
    assert time.perf_counter() - t0 < 2.0
    assert got[3:] == [
        '{"line":5,"op":"dwrite","ret":-12}', '{"line":6,"op":"dread","ret":-12}',
        '{"line":7,"op":"dsnapshot","ret":-12}', '{"line":8,"op":"dcheck_exclusive","ret":0}',
        '{"line":9,"op":"check","page":1,"ret":"segv"}', '{"line":10,"op":"fill","page":1,"ret":"segv"}',
        '{"line":11,"op":"read","page":1,"ret":"segv"}', '{"line":12,"op":"touch","page":1,"ret":"segv"}']

"""The README's Python examples run (in order, sharing one namespace) and the counter keys
they read are real."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    ns: dict[str, object] = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for code in blocks:
            exec(compile(code, str(README), "exec"), ns)
    lines = out.getvalue().splitlines()
    walks, faults, mmap_locks = map(int, lines[0].split())
    assert walks >= 1 and faults >= 15 and mmap_locks >= 1, "the measured read walked and faulted"
    assert any(line.startswith("hmm_range_fault_end:") and "walks=2 faults=1" in line for line in lines)
    assert any(line.startswith("mmu_notifier_invalidate_range_start:") and "MMU_NOTIFY_UNMAP" in line
               for line in lines)

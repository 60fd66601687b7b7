"""Running scenarios on the model (in process) and on a real kernel (a runner command).

The kernel side is any command with ``kernel-run``'s interface: ``CMD --kernel K
--timeout SEC FILE...`` printing the scenarios' JSON lines on stdout (``{"file":...}``
before each file), kernel WARN/BUG/Oops lines on stderr, and exiting 0 (payload
finished), 125 (crash or hang) or 124 (timeout). It is found in ``--runner``, else the
``HMMSIM_KERNEL_RUNNER`` environment variable, else ``kernel-run`` on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..scenario.run import reference_config, run_scenario_text
from .results import RunResult, parse_kernel_run, parse_outputs

__all__ = ("KernelRunner", "find_runner", "run_model")


def run_model(texts: dict[str, str], kernel: str) -> dict[str, RunResult]:
    """Run each scenario text on hmmsim's model of *kernel* (reference machine)."""
    out: dict[str, RunResult] = {}
    for name, text in texts.items():
        lines = run_scenario_text(text, reference_config(kernel))
        out[name] = parse_outputs("\n".join(lines), [name])[name]
    return out


def find_runner(explicit: str | None = None) -> str | None:
    """The kernel runner command (see the module docstring), or None."""
    for cand in (explicit, os.environ.get("HMMSIM_KERNEL_RUNNER"), shutil.which("kernel-run")):
        if cand and Path(cand).exists():
            return str(cand)
    return None


@dataclass
class KernelRunner:
    """A real kernel behind a runner command."""

    command: str
    timeout: int = 120

    def run(self, texts: dict[str, str], kernel: str) -> dict[str, RunResult]:
        """Run the scenarios (one boot for all of them; a crash or hang skips the rest:
        they are run again in a boot of their own)."""
        names = list(texts)
        res: dict[str, RunResult] = {}
        while names:
            got = self._boot(names, texts, kernel)
            res.update({n: r for n, r in got.items() if r.outcome != "skipped"})
            names = [n for n in names if got[n].outcome == "skipped"]
        return res

    def _boot(self, names: list[str], texts: dict[str, str], kernel: str) -> dict[str, RunResult]:
        with tempfile.TemporaryDirectory(prefix="hmmsim-oracle-") as d:
            paths = []
            for n in names:
                p = Path(d) / n
                p.write_text(texts[n])
                paths.append(str(p))
            proc = subprocess.run([self.command, "--kernel", kernel, "--timeout", str(self.timeout), *paths],
                                  capture_output=True, text=True, timeout=self.timeout + 300, check=False)
        return parse_kernel_run(proc.stdout, proc.stderr, proc.returncode, names)

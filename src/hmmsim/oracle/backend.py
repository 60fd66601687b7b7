"""Running scenarios on the model (in process) and on a real kernel (a runner command).

The kernel side is any command with ``kernel-run``'s interface: ``CMD --kernel K
--timeout SEC FILE...`` printing the scenarios' JSON lines on stdout (``{"file":...}``
before each file), kernel WARN/BUG/Oops lines on stderr, and exiting 0 (payload
finished), 125 (crash or hang) or 124 (timeout). It is found in ``--runner``, else the
``HMMSIM_KERNEL_RUNNER`` environment variable, else ``hmmsim oracle run`` when the cache
holds an image of the kernel (:mod:`hmmsim.oracle.cache`), else ``kernel-run`` on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..scenario.run import reference_config, run_scenario_text
from .cache import find_image
from .results import RunResult, parse_kernel_run, parse_outputs

__all__ = ("KernelRunner", "ORACLE_RUN", "find_runner", "run_model")


def run_model(texts: dict[str, str], kernel: str) -> dict[str, RunResult]:
    """Run each scenario text on hmmsim's model of *kernel* (reference machine)."""
    out: dict[str, RunResult] = {}
    for name, text in texts.items():
        lines = run_scenario_text(text, reference_config(kernel))
        out[name] = parse_outputs("\n".join(lines), [name])[name]
    return out


#: ``hmmsim oracle run`` as a runner command (the same Python, this package)
ORACLE_RUN = (sys.executable, "-m", "hmmsim.cli", "oracle", "run")


def find_runner(explicit: str | None = None, kernel: str | None = None) -> str | list[str] | None:
    """The kernel runner command (see the module docstring), or None: *explicit*, else
    ``$HMMSIM_KERNEL_RUNNER``, else ``hmmsim oracle run`` if the cache has an image of
    *kernel*, else ``kernel-run`` on PATH."""
    for cand in (explicit, os.environ.get("HMMSIM_KERNEL_RUNNER")):
        if cand and Path(cand).exists():
            return str(cand)
    if kernel is not None and find_image(kernel) is not None:
        return list(ORACLE_RUN)
    cand = shutil.which("kernel-run")
    return str(cand) if cand else None


@dataclass
class KernelRunner:
    """A real kernel behind a runner command (a path, or an argument list)."""

    command: str | Sequence[str]
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
            cmd = [self.command] if isinstance(self.command, str) else list(self.command)
            proc = subprocess.run([*cmd, "--kernel", kernel, "--timeout", str(self.timeout), *paths],
                                  capture_output=True, text=True, timeout=self.timeout + 300, check=False)
        return parse_kernel_run(proc.stdout, proc.stderr, proc.returncode, names)

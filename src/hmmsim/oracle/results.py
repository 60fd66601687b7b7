"""What a scenario run printed, from hmmsim or from a real kernel, and what happened to the
kernel: output lines per file, kernel WARN/BUG/oops lines, crash or hang.

A real kernel's run (``kernel-run`` or ``hmmsim oracle run``) gives the scenario lines on
stdout (``{"file":NAME}`` before each file when there are several), the kernel's
WARN/BUG/Oops lines on stderr (``kernel-run: kernel: [time] WARNING: ...``, or
``hmmsim-oracle (NAME): kernel: [time] WARNING: ...`` naming the file that ran), and an exit
status: 0 when the payload finished, 125 when the kernel crashed or hung, 124 on timeout.
A crash or hang stops the output in the middle of the file that caused it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ("KernelEvent", "RunResult", "parse_kernel_run", "parse_outputs", "split_outputs")

_KERNEL_LINE = re.compile(r"^(?:kernel-run|hmmsim-oracle(?: \((?P<file>.*?)\))?): kernel: "
                          r"\[\s*[0-9.]+\]\s*(?P<msg>.*)$")
#: console messages that make a run "WARN" / "crash"
_WARN = re.compile(r"^(WARNING:|------------\[ cut here \]|BUG: Bad (page|rss)|BUG: Bad page map)")
_CRASH = re.compile(r"^(BUG: |Oops|kernel BUG at|general protection fault|Kernel panic)")


@dataclass
class KernelEvent:
    """A console line that matters: ``kind`` is ``warn`` or ``crash``."""

    kind: str
    message: str
    file: str | None = None


@dataclass
class RunResult:
    """One scenario file's result: its output records and, for a kernel run, what the
    kernel reported while running it (``outcome``: ``ok``, ``warn``, ``crash`` or
    ``hang``)."""

    name: str
    records: list[dict[str, Any]] = field(default_factory=list)
    events: list[KernelEvent] = field(default_factory=list)
    outcome: str = "ok"

    @property
    def lines(self) -> list[str]:
        """The records as ``hmmsim run`` prints them (keys sorted, no spaces)."""
        return [json.dumps(r, sort_keys=True, separators=(",", ":")) for r in self.records]


def split_outputs(text: str, names: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The records of each file of a JSON-lines stream. ``{"file":NAME}`` records start a
    file; without them the whole stream is one file (named ``names[0]``, or ``-``).
    Lines that are not JSON objects (a tool's own messages) are skipped."""
    out: dict[str, list[dict[str, Any]]] = {}
    cur: str | None = None
    for raw in text.splitlines():
        raw = raw.strip()
        if not raw.startswith("{"):
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if set(rec) == {"file"}:
            cur = str(rec["file"])
            out.setdefault(cur, [])
            continue
        if cur is None:
            cur = names[0] if names else "-"
            out.setdefault(cur, [])
        out[cur].append(rec)
    for n in names or []:
        out.setdefault(n, [])
    return out


def parse_outputs(text: str, names: list[str] | None = None) -> dict[str, RunResult]:
    """:func:`split_outputs` as :class:`RunResult` objects (hmmsim's own output: an
    ``error`` record of kind ``kernel-oops``/``kernel-hang`` is the model saying the real
    kernel would crash/hang there)."""
    res = {}
    for name, recs in split_outputs(text, names).items():
        r = RunResult(name, recs)
        kinds = {rec.get("error") for rec in recs}
        if "kernel-oops" in kinds:
            r.outcome = "crash"
        elif "kernel-hang" in kinds:
            r.outcome = "hang"
        res[name] = r
    return res


def _events(stderr: str) -> list[KernelEvent]:
    ev = []
    for raw in stderr.splitlines():
        m = _KERNEL_LINE.match(raw.strip())
        if not m:
            continue
        msg = m.group("msg")
        if _CRASH.match(msg):
            ev.append(KernelEvent("crash", msg, m.group("file")))
        elif _WARN.match(msg):
            ev.append(KernelEvent("warn", msg, m.group("file")))
    return ev


def parse_kernel_run(stdout: str, stderr: str, status: int, names: list[str]) -> dict[str, RunResult]:
    """The per-file results of one kernel run of the files *names* (in order). Kernel
    events are given to the file that was running when they were printed: the file the
    line names (``hmmsim oracle run``), else the last file with output, or the first if
    none printed anything. A crash or hang belongs to the
    file that was running then; later files did not run (they get outcome ``skipped``)."""
    recs = split_outputs(stdout, names)
    started = [n for n in names if n in recs and (recs[n] or len(names) == 1 or f'"file":"{n}"' in stdout)]
    last = started[-1] if started else names[0]
    res = {n: RunResult(n, recs.get(n, [])) for n in names}
    events = _events(stderr)
    for e in events:
        res[e.file if e.file in res else last].events.append(e)
    for r in res.values():
        if any(e.kind == "warn" for e in r.events):
            r.outcome = "warn"
    if status == 125:
        res[last].outcome = "crash" if any(e.kind == "crash" for e in res[last].events) else "hang"
    elif status == 124:
        res[last].outcome = "hang"
    if status in (124, 125):
        for n in names[names.index(last) + 1:]:
            res[n].outcome = "skipped"
    return res

"""Reading what a boot of ``hmmsim oracle run`` left: the kernel console (first serial
port) and the payload's output (second serial port), as written by the init script of
:mod:`hmmsim.oracle.initramfs`.

The console gives the kernel's WARN/BUG/Oops lines, each with the scenario file that was
running (the last ``hmmsim-oracle: file N`` kernel-log marker before it), and whether the
payload finished (``hmmsim-oracle: end rc=RC``). The payload's output gives each file's
JSON lines (after its ``@@hmmsim-file N`` marker) and its runner's exit status
(``@@hmmsim-rc N RC``). This module models no kernel code."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .initramfs import FAIL_MARK, FILE_MARK, KMSG_END, KMSG_FILE, RC_MARK

__all__ = ("BootReport", "ConsoleEvent", "FileOutput", "parse_console", "parse_program")

_TIME = re.compile(r"^\[\s*(?P<time>[0-9]+\.[0-9]+)\]\s?(?P<msg>.*)$")
#: the init script's kernel-log markers, found anywhere in a line (a console line can
#: start with the tail of another writer's output)
_FILE_MARKER = re.compile(re.escape(KMSG_FILE) + r" (?P<n>[0-9]+)")
_END_MARKER = re.compile(re.escape(KMSG_END) + r"(?P<rc>-?[0-9]+)")
#: console lines reported on stderr (as kernel-run does)
_REPORT = re.compile(r"WARNING:|BUG:|Oops|Kernel panic|general protection|INFO: task .* blocked|"
                     r"kernel BUG at|detected stalls on CPUs")


@dataclass
class ConsoleEvent:
    """A console line worth reporting, and the file (1-based index, 0 before any) that
    was running when the kernel printed it."""

    file: int
    time: str
    message: str


@dataclass
class BootReport:
    """The console's story: events, whether the payload ended (and its status), the
    file running last."""

    events: list[ConsoleEvent] = field(default_factory=list)
    ended: bool = False
    rc: int | None = None
    last_file: int = 0


def parse_console(text: str) -> BootReport:
    """Read a console log (``\\r`` already removed or not).

    >>> r = parse_console("[ 1.0] hmmsim-oracle: file 2\\n[ 1.5] WARNING: CPU: 0 at mm/x.c:1\\n"
    ...                   "sh: e[ 2.0] hmmsim-oracle: end rc=0\\n")
    >>> r.ended, r.rc, r.events[0].file, r.events[0].message
    (True, 0, 2, 'WARNING: CPU: 0 at mm/x.c:1')
    """
    rep = BootReport()
    for raw in text.replace("\r", "").splitlines():
        m = _TIME.match(raw.strip())
        time, msg = (m.group("time"), m.group("msg")) if m else ("", raw.strip())
        mark = _FILE_MARKER.search(msg)
        if mark:
            rep.last_file = int(mark.group("n"))
            continue
        mark = _END_MARKER.search(msg)
        if mark:
            rep.ended = True
            rep.rc = int(mark.group("rc"))
            continue
        if _REPORT.search(msg):
            rep.events.append(ConsoleEvent(rep.last_file, time, msg))
    return rep


@dataclass
class FileOutput:
    """One scenario file's part of the payload output: its JSON lines, its runner's exit
    status (None if it never ended), whether it started, and whether the runner timed out on it (then its
    trailing ``{"error":"timeout",...}`` record is left out of ``lines``: the kernel hangs)."""

    index: int
    lines: list[str] = field(default_factory=list)
    rc: int | None = None
    timed_out: bool = False
    started: bool = False


def parse_program(text: str, nfiles: int) -> tuple[list[FileOutput], list[str], str | None]:
    """Split the payload's output: (per-file outputs for files 1..nfiles, other lines
    (diagnostics), the failure marker if the payload stopped on one).

    >>> outs, other, fail = parse_program('@@hmmsim-file 1\\n{"a":1}\\n@@hmmsim-rc 1 0\\n', 1)
    >>> outs[0].lines, outs[0].rc, other, fail
    (['{"a":1}'], 0, [], None)
    """
    outs = [FileOutput(i) for i in range(1, nfiles + 1)]
    other: list[str] = []
    fail: str | None = None
    cur: FileOutput | None = None
    for raw in text.replace("\r", "").splitlines():
        line = raw.strip()
        if not line:
            continue
        word, _, rest = line.partition(" ")
        if word in (FILE_MARK, RC_MARK):
            parts = rest.split()
            try:
                idx = int(parts[0])
            except (ValueError, IndexError):
                other.append(line)
                continue
            if not 1 <= idx <= nfiles:
                other.append(line)
                continue
            if word == FILE_MARK:
                cur = outs[idx - 1]
                cur.started = True
            else:
                try:
                    outs[idx - 1].rc = int(parts[1])
                except (ValueError, IndexError):
                    outs[idx - 1].rc = -1
                cur = None
            continue
        if word == FAIL_MARK:
            fail = rest
            continue
        if line.startswith("{") and cur is not None:
            cur.lines.append(line)
        else:
            other.append(line)
    for o in outs:
        if o.rc == 7 and o.lines and o.lines[-1].startswith('{"error":"timeout"'):
            o.lines.pop()
            o.timed_out = True
    return outs, other, fail

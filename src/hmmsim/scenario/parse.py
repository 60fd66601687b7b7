"""Parser of the hmmsim scenario language, version 1 (``spec/scenario.md``).

This module models no kernel file: it turns the bytes of a ``.hmm`` scenario into an AST
(:class:`Scenario` of :class:`Command` and :class:`Fork` nodes) and runs nothing. The
runner executes the AST. ``spec/scenario-conventions.md`` completes the spec and wins where
the two differ; its sections 2 (names) and 3 (syntax) are implemented here.

Parse errors
    :class:`ScenarioParseError` carries the line to report (``{"error":"parse","line":N}``).
    Every offending line is considered, and the **smallest** line number wins: a line error,
    or the ``fork`` line of a ``fork`` that is never closed (the outermost one). After a first
    line error the parser keeps matching ``fork``/``endfork`` lines (lines of exactly that one
    token), only to learn whether an earlier ``fork`` stays open.

Lines
    Lines are split on ``\\n`` only; a file has as many lines as ``\\n`` characters, plus one if
    text follows the last ``\\n`` (``b"a\\nb\\n"`` and ``b"a\\nb"`` both have 2 lines, ``b""``
    has 0). A missing header in a file with no command line is reported at that count + 1.
    One trailing ``\\r`` is dropped from each raw line before anything else, so a ``\\r``
    before a comment or inside the line stays in its token (and makes it invalid). A NUL
    byte or invalid UTF-8 anywhere in a line, comments included, is an error on that line.
    Only space and tab separate tokens (a UTF-8 BOM or any other whitespace is part of a
    token).

Names
    Regions, files and handles are three namespaces, checked statically in text order with
    fork scoping. A command naming something undefined parses fine with
    ``unknown_name=True``. A command always defines what it defines (``mmap NAME``,
    ``mremap NAME NEW``, ``file F``, ``open D``), after its uses are checked, even when it
    has ``unknown_name=True`` itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

__all__ = (
    "Command",
    "Fork",
    "Node",
    "Scenario",
    "ScenarioParseError",
    "parse_scenario",
)

HEADER = ("hmmsim-scenario", "1")
PROTS = frozenset({"none", "r", "rw"})
ADVICES = frozenset({"hugepage", "nohugepage", "dontneed", "free"})
MAX_ALIGN = 262144

# Number kinds: (minimum, maximum), inclusive (conventions item 11).
_NUMBER_RANGES: dict[str, tuple[int, int]] = {
    "count": (0, 1 << 22),  # OFF and NPAGES
    "dev": (0, 1 << 20),
    "value": (0, 1 << 40),  # dflags VALUE
    "seed": (-(1 << 63), (1 << 63) - 1),
}

# Name kinds: namespace of a use, or "new_" + namespace for a definition.
_NAMESPACES = ("region", "file", "handle")

# Operand kinds of the fixed-arity commands (mmap and mremap are parsed on their own).
_SIGNATURES: dict[str, tuple[str, ...]] = {
    "munmap": ("region", "count", "count"),
    "mprotect": ("region", "count", "count", "prot"),
    "madvise": ("region", "count", "count", "advice"),
    "fill": ("region", "count", "count", "seed"),
    "touch": ("region", "count", "count"),
    "read": ("region", "count", "count"),
    "check": ("region", "count", "count", "seed"),
    "file": ("new_file", "count"),
    "pwrite": ("file", "count", "count", "seed"),
    "pread": ("file", "count", "count"),
    "open": ("new_handle", "dev"),
    "close": ("handle",),
    "drelease": ("handle",),
    "dflags": ("handle", "value"),
    "dread": ("handle", "region", "count", "count"),
    "dread_unlocked": ("handle", "region", "count", "count"),
    "uffd": ("region", "count", "count", "seed"),
    "dwrite": ("handle", "region", "count", "count", "seed"),
    "dmigrate": ("handle", "region", "count", "count"),
    "dmigrate_sys": ("handle", "region", "count", "count"),
    "dmigrate_on_fault": ("handle", "region", "count", "count"),
    "dsnapshot": ("handle", "region", "count", "count"),
    "dexclusive": ("handle", "region", "count", "count"),
    "dcheck_exclusive": ("handle", "region", "count", "count"),
}

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UNSIGNED_RE = re.compile(r"[0-9]+")
_SIGNED_RE = re.compile(r"-?[0-9]+")
_SEPARATOR_RE = re.compile(r"[ \t]+")


class ScenarioParseError(Exception):
    """A parse error; ``.line`` is the 1-based line number the spec says to report."""

    line: int

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Command:
    """One command line: its op word and typed operands (see the module's ``_SIGNATURES``)."""

    line: int
    op: str
    args: tuple
    unknown_name: bool


@dataclass(frozen=True, slots=True)
class Fork:
    """A ``fork`` ... ``endfork`` block; ``body`` runs in the child."""

    line: int
    end_line: int
    body: tuple


Node = Union[Command, Fork]


@dataclass(frozen=True, slots=True)
class Scenario:
    """A parsed scenario: the top-level nodes, in source order."""

    body: tuple


@dataclass(slots=True)
class _Block:
    """A block being built: an open ``fork`` (line > 0) or the top level (line 0)."""

    line: int
    body: list[Node]
    names: dict[str, set[str]]


def _split_lines(data: bytes | str) -> list[bytes]:
    """Split a file into raw lines (see "Lines" in the module docstring)."""
    if isinstance(data, str):
        # Lone surrogates survive here and fail the strict per-line decode later.
        data = data.encode("utf-8", "surrogatepass")
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


def _tokenize(raw: bytes, line: int) -> list[str]:
    """Return the tokens of one raw line, comment removed (``[]`` for a blank line)."""
    if b"\0" in raw:
        raise ScenarioParseError(line, "NUL byte")
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ScenarioParseError(line, "invalid UTF-8") from None
    text = text.split("#", 1)[0]
    return [token for token in _SEPARATOR_RE.split(text) if token]


def _parse_name(token: str, line: int) -> str:
    """Check a NAME token."""
    if not _NAME_RE.fullmatch(token):
        raise ScenarioParseError(line, f"bad name {token!r}")
    return token


def _parse_number(token: str, kind: str, line: int) -> int:
    """Parse a decimal number of ``kind`` (a key of ``_NUMBER_RANGES``)."""
    low, high = _NUMBER_RANGES[kind]
    pattern = _SIGNED_RE if low < 0 else _UNSIGNED_RE
    if not pattern.fullmatch(token):
        raise ScenarioParseError(line, f"bad number {token!r}")
    digits = token.lstrip("-").lstrip("0") or "0"
    value = int(digits) if len(digits) <= 20 else 1 << 80  # no int() of huge strings
    if token.startswith("-"):
        value = -value
    if not low <= value <= high:
        raise ScenarioParseError(line, f"number {token!r} out of range")
    return value


def _parse_word(token: str, allowed: frozenset[str], what: str, line: int) -> str:
    """Check a keyword operand (PROT, ADVICE)."""
    if token not in allowed:
        raise ScenarioParseError(line, f"bad {what} {token!r}")
    return token


def _parse_flags(token: str, line: int) -> tuple[str, str, str | None, bool]:
    """Parse mmap FLAGS: ``private|shared,anon|file=F|dev=D[,hugetlb]``."""
    parts = token.split(",")
    if len(parts) not in (2, 3) or parts[0] not in ("private", "shared"):
        raise ScenarioParseError(line, f"bad mmap flags {token!r}")
    if len(parts) == 3 and parts[2] != "hugetlb":
        raise ScenarioParseError(line, f"bad mmap flags {token!r}")
    backing, sep, backing_name = parts[1].partition("=")
    if backing == "anon" and not sep:
        return parts[0], "anon", None, len(parts) == 3
    if backing in ("file", "dev") and sep:
        return parts[0], backing, _parse_name(backing_name, line), len(parts) == 3
    raise ScenarioParseError(line, f"bad mmap flags {token!r}")


def _parse_align(token: str, line: int) -> int:
    """Parse ``align=A``: a power of two, 1..262144."""
    key, sep, value = token.partition("=")
    if key != "align" or not sep or not _UNSIGNED_RE.fullmatch(value):
        raise ScenarioParseError(line, f"bad mmap operand {token!r}")
    digits = value.lstrip("0")
    align = int(digits) if 0 < len(digits) <= 7 else 0
    if not 1 <= align <= MAX_ALIGN or align & (align - 1):
        raise ScenarioParseError(line, f"bad alignment {token!r}")
    return align


def _parse_command(
    op: str, operands: list[str], line: int
) -> tuple[tuple, list[tuple[str, str]], list[tuple[str, str]]]:
    """Parse one command line: return (args, uses, defs), uses/defs as (namespace, name)."""
    uses: list[tuple[str, str]] = []
    defs: list[tuple[str, str]] = []
    if op == "mmap":
        if len(operands) not in (4, 5):
            raise ScenarioParseError(line, "mmap takes 4 or 5 operands")
        name = _parse_name(operands[0], line)
        npages = _parse_number(operands[1], "count", line)
        prot = _parse_word(operands[2], PROTS, "prot", line)
        share, backing, backing_name, hugetlb = _parse_flags(operands[3], line)
        align = _parse_align(operands[4], line) if len(operands) == 5 else 1
        if backing_name is not None:
            uses.append(("file" if backing == "file" else "handle", backing_name))
        defs.append(("region", name))
        return (name, npages, prot, share, backing, backing_name, hugetlb, align), uses, defs
    if op == "mremap":
        if len(operands) not in (3, 4) or operands[3:] not in ([], ["dontunmap"]):
            raise ScenarioParseError(line, "mremap takes NAME NEW NPAGES [dontunmap]")
        name = _parse_name(operands[0], line)
        new = _parse_name(operands[1], line)
        npages = _parse_number(operands[2], "count", line)
        uses.append(("region", name))
        defs.append(("region", new))
        return (name, new, npages, len(operands) == 4), uses, defs
    signature = _SIGNATURES.get(op)
    if signature is None:
        raise ScenarioParseError(line, f"unknown op {op!r}")
    if len(operands) != len(signature):
        raise ScenarioParseError(line, f"{op} takes {len(signature)} operands")
    args: list[object] = []
    for kind, token in zip(signature, operands):
        if kind in _NUMBER_RANGES:
            args.append(_parse_number(token, kind, line))
        elif kind == "prot":
            args.append(_parse_word(token, PROTS, "prot", line))
        elif kind == "advice":
            args.append(_parse_word(token, ADVICES, "advice", line))
        elif kind.startswith("new_"):
            args.append(_parse_name(token, line))
            defs.append((kind[4:], token))
        else:
            args.append(_parse_name(token, line))
            uses.append((kind, token))
    return tuple(args), uses, defs


def _parse_line(tokens: list[str], line: int, header_seen: bool, blocks: list[_Block]) -> bool:
    """Parse one non-blank line into ``blocks``; return whether the header has been seen."""
    if not header_seen:
        if tuple(tokens) != HEADER:
            raise ScenarioParseError(line, "the first line must be 'hmmsim-scenario 1'")
        return True
    op, operands = tokens[0], tokens[1:]
    block = blocks[-1]
    if op == "fork":
        if operands:
            raise ScenarioParseError(line, "fork takes no operand")
        names = {namespace: set(bound) for namespace, bound in block.names.items()}
        blocks.append(_Block(line, [], names))
    elif op == "endfork":
        if operands:
            raise ScenarioParseError(line, "endfork takes no operand")
        if len(blocks) == 1:
            raise ScenarioParseError(line, "endfork without fork")
        blocks.pop()
        blocks[-1].body.append(Fork(block.line, line, tuple(block.body)))
    else:
        args, uses, defs = _parse_command(op, operands, line)
        unknown = any(name not in block.names[namespace] for namespace, name in uses)
        for namespace, name in defs:
            block.names[namespace].add(name)
        block.body.append(Command(line, op, args, unknown))
    return True


def parse_scenario(data: bytes | str) -> Scenario:
    """Parse a scenario file; raise :class:`ScenarioParseError` at the first offending line.

    >>> parse_scenario(b"hmmsim-scenario 1\\nopen d 0\\nclose e\\n").body[1]
    Command(line=3, op='close', args=('e',), unknown_name=True)
    """
    lines = _split_lines(data)
    blocks = [_Block(0, [], {namespace: set() for namespace in _NAMESPACES})]
    header_seen = False
    error: ScenarioParseError | None = None
    for line, raw in enumerate(lines, 1):
        try:
            tokens = _tokenize(raw, line)
        except ScenarioParseError as exc:
            error = error or exc
            continue
        if not tokens:
            continue
        if error is not None:
            # Only learn whether a fork before the error is left open.
            if tokens == ["fork"]:
                blocks.append(_Block(line, [], blocks[-1].names))
            elif tokens == ["endfork"] and len(blocks) > 1:
                blocks.pop()
            continue
        try:
            header_seen = _parse_line(tokens, line, header_seen, blocks)
        except ScenarioParseError as exc:
            error = exc
    if len(blocks) > 1 and (error is None or blocks[1].line < error.line):
        error = ScenarioParseError(blocks[1].line, "fork without endfork")
    if error is None and not header_seen:
        error = ScenarioParseError(len(lines) + 1, "missing header")
    if error is not None:
        raise error
    return Scenario(tuple(blocks[0].body))

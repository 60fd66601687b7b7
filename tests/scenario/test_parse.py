"""Tests of the scenario language parser (``hmmsim.scenario.parse``, ``spec/scenario.md``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hmmsim.scenario.parse import Command, Fork, Scenario, ScenarioParseError, parse_scenario

GOLDEN = Path(__file__).parent / "golden"
H = b"hmmsim-scenario 1\n"


def parse_error_line(data: bytes | str) -> int:
    """Parse ``data``, which must fail; return the reported line."""
    with pytest.raises(ScenarioParseError) as excinfo:
        parse_scenario(data)
    return excinfo.value.line


def commands_of(data: bytes | str) -> list[tuple]:
    """(line, op, args, unknown_name) of the top-level commands of a valid scenario."""
    return [(c.line, c.op, c.args, c.unknown_name) for c in parse_scenario(data).body]


def unknown_flags(text: str) -> list[bool]:
    """unknown_name of every command, depth first, of ``H + text``."""

    def walk(body: tuple) -> list[bool]:
        flags: list[bool] = []
        for node in body:
            flags.extend(walk(node.body) if isinstance(node, Fork) else [node.unknown_name])
        return flags

    return walk(parse_scenario(H + text.encode()).body)


# --- golden files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted(GOLDEN.glob("*.hmm")) if GOLDEN.is_dir() else [], ids=lambda p: p.name
)
def test_parse_scenario_golden(path: Path) -> None:
    scenario = parse_scenario(path.read_bytes())
    assert scenario.body
    assert all(not c.unknown_name for c in scenario.body if isinstance(c, Command))


def test_parse_scenario_golden_present() -> None:
    if not GOLDEN.is_dir():
        pytest.skip("no /work/shared/golden")
    assert len(list(GOLDEN.glob("*.hmm"))) >= 12


def test_parse_scenario_golden_fork() -> None:
    path = GOLDEN / "mirror_fork_parent_cow.hmm"
    if not path.exists():
        pytest.skip("no golden fork scenario")
    body = parse_scenario(path.read_bytes()).body
    assert body[4] == Fork(
        9,
        12,
        (
            Command(10, "fill", ("a", 0, 8, 31), False),
            Command(11, "check", ("a", 0, 8, 31), False),
        ),
    )
    assert body[5] == Command(13, "dsnapshot", ("d", "a", 0, 8), False)


# --- every op, exact AST --------------------------------------------------------------------

ALL_OPS = b"""# every command of the language
hmmsim-scenario 1
open d 0
file f 8
mmap a 16 rw private,anon
mmap b 1024 r shared,file=f,hugetlb align=512
mmap c 2 none private,dev=d
munmap a 3 1
mprotect a 0 4 r
madvise a 0 16 hugepage
madvise a 0 16 nohugepage
madvise a 0 1 dontneed
madvise a 0 1 free
mremap a n 4
mremap a m 4 dontunmap
fill a 0 16 -3
touch a 0 16
read a 0 16
check a 0 16 -3
pwrite f 0 8 7
pread f 2 6
dread d a 0 16
dwrite d a 0 16 5
dmigrate d a 0 16
dmigrate_sys d a 0 16
dsnapshot d a 0 16
dexclusive d a 0 16
dcheck_exclusive d a 0 16
dflags d 3
drelease d
close d
fork
fork
endfork
endfork
"""


def test_parse_scenario_every_op() -> None:
    body = parse_scenario(ALL_OPS).body
    assert [(c.line, c.op, c.args) for c in body[:-1]] == [
        (3, "open", ("d", 0)),
        (4, "file", ("f", 8)),
        (5, "mmap", ("a", 16, "rw", "private", "anon", None, False, 1)),
        (6, "mmap", ("b", 1024, "r", "shared", "file", "f", True, 512)),
        (7, "mmap", ("c", 2, "none", "private", "dev", "d", False, 1)),
        (8, "munmap", ("a", 3, 1)),
        (9, "mprotect", ("a", 0, 4, "r")),
        (10, "madvise", ("a", 0, 16, "hugepage")),
        (11, "madvise", ("a", 0, 16, "nohugepage")),
        (12, "madvise", ("a", 0, 1, "dontneed")),
        (13, "madvise", ("a", 0, 1, "free")),
        (14, "mremap", ("a", "n", 4, False)),
        (15, "mremap", ("a", "m", 4, True)),
        (16, "fill", ("a", 0, 16, -3)),
        (17, "touch", ("a", 0, 16)),
        (18, "read", ("a", 0, 16)),
        (19, "check", ("a", 0, 16, -3)),
        (20, "pwrite", ("f", 0, 8, 7)),
        (21, "pread", ("f", 2, 6)),
        (22, "dread", ("d", "a", 0, 16)),
        (23, "dwrite", ("d", "a", 0, 16, 5)),
        (24, "dmigrate", ("d", "a", 0, 16)),
        (25, "dmigrate_sys", ("d", "a", 0, 16)),
        (26, "dsnapshot", ("d", "a", 0, 16)),
        (27, "dexclusive", ("d", "a", 0, 16)),
        (28, "dcheck_exclusive", ("d", "a", 0, 16)),
        (29, "dflags", ("d", 3)),
        (30, "drelease", ("d",)),
        (31, "close", ("d",)),
    ]
    assert not any(c.unknown_name for c in body[:-1])
    assert body[-1] == Fork(32, 35, (Fork(33, 34, ()),))


def test_parse_scenario_header_only() -> None:
    assert parse_scenario(H) == Scenario(())
    assert parse_scenario("# c\n\n \t# d\n\thmmsim-scenario \t 1 # v1") == Scenario(())


def test_parse_scenario_str_and_bytes_agree() -> None:
    assert parse_scenario(ALL_OPS.decode()) == parse_scenario(ALL_OPS)


# --- lexical details that parse -------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"hmmsim-scenario 1\r\nopen d 0\r\n", [(2, "open", ("d", 0), False)]),
        (b"hmmsim-scenario 1\r\nopen d 0\r", [(2, "open", ("d", 0), False)]),
        (H + b"\topen\t d\t0 \t\n", [(2, "open", ("d", 0), False)]),
        (H + b"open d 0# comment\n", [(2, "open", ("d", 0), False)]),
        (H + b"open d 0 #\n", [(2, "open", ("d", 0), False)]),
        (H + b"open d 0 # \xc3\xa9 unicode \r comment\r\n", [(2, "open", ("d", 0), False)]),
        (H + b"\n  \n# x\nopen d 0\n\n", [(5, "open", ("d", 0), False)]),
        (H + b"open d 1048576\n", [(2, "open", ("d", 1048576), False)]),
        (H + b"open d 007\n", [(2, "open", ("d", 7), False)]),
        (H + b"file f 0\n", [(2, "file", ("f", 0), False)]),
        (H + b"file f 4194304\n", [(2, "file", ("f", 4194304), False)]),
        (H + b"file _F9 1\n", [(2, "file", ("_F9", 1), False)]),
        (H + b"open d 0\ndflags d 1099511627776\n", [
            (2, "open", ("d", 0), False),
            (3, "dflags", ("d", 1 << 40), False),
        ]),
        (H + b"file f 1\npwrite f 4194304 0 -9223372036854775808\n", [
            (2, "file", ("f", 1), False),
            (3, "pwrite", ("f", 4194304, 0, -(1 << 63)), False),
        ]),
        (H + b"file f 1\npwrite f 0 1 9223372036854775807\npwrite f 0 1 -0\n", [
            (2, "file", ("f", 1), False),
            (3, "pwrite", ("f", 0, 1, (1 << 63) - 1), False),
            (4, "pwrite", ("f", 0, 1, 0), False),
        ]),
        (H + b"mmap a 1 rw private,anon align=1\n", [
            (2, "mmap", ("a", 1, "rw", "private", "anon", None, False, 1), False),
        ]),
        (H + b"mmap a 0 none shared,anon,hugetlb align=262144\n", [
            (2, "mmap", ("a", 0, "none", "shared", "anon", None, True, 262144), False),
        ]),
        (H + b"open d 2\nmmap a 1 rw shared,dev=d,hugetlb\n", [
            (2, "open", ("d", 2), False),
            (3, "mmap", ("a", 1, "rw", "shared", "dev", "d", True, 1), False),
        ]),
        # Keywords are fine as names.
        (H + b"mmap mmap 1 r private,anon\nfill mmap 0 1 1\n", [
            (2, "mmap", ("mmap", 1, "r", "private", "anon", None, False, 1), False),
            (3, "fill", ("mmap", 0, 1, 1), False),
        ]),
    ],
)
def test_parse_scenario_accepts(data: bytes, expected: list[tuple]) -> None:
    assert commands_of(data) == expected


# --- parse errors and the line they report --------------------------------------------------

ERRORS: list[tuple[str, bytes | str, int]] = [
    # Missing header: the line after the last one.
    ("empty", b"", 1),
    ("one-blank-line", b"\n", 2),
    ("comment-only", b"# c\n", 2),
    ("comment-no-newline", b"# c", 2),
    ("comments-and-blanks", b"# a\n\n# b", 4),
    ("comments-and-blanks-newline", b"# a\n\n# b\n", 4),
    # Bad header.
    ("command-first", b"# c\nopen d 0\n", 2),
    ("header-extra-token", b"# c\nhmmsim-scenario 1 x\n", 2),
    ("header-version-2", b"hmmsim-scenario 2\n", 1),
    ("header-version-01", b"hmmsim-scenario 01\n", 1),
    ("header-uppercase", b"HMMSIM-SCENARIO 1\n", 1),
    ("header-split", b"hmmsim-scenario\n1\n", 1),
    ("header-bom", b"\xef\xbb\xbfhmmsim-scenario 1\n", 1),
    ("header-twice", H + H, 2),
    # NUL bytes, UTF-8, separators, \r.
    ("nul-in-comment", H + b"open d 0\n# x\0y\n", 3),
    ("nul-before-header", b"\n\0\nhmmsim-scenario 1\n", 2),
    ("nul-in-token", H + b"open d\x000\n", 2),
    ("invalid-utf8", H + b"open d\xc3 0\n", 2),
    ("invalid-utf8-in-comment", H + b"open d 0\n\nopen e 1 # \xff\n", 4),
    ("invalid-utf8-overlong", H + b"open \xc0\xaf 0\n", 2),
    ("invalid-utf8-surrogate", H + b"open \xed\xa0\x80 0\n", 2),
    ("lone-surrogate-str", "hmmsim-scenario 1\nopen \ud800 0\n", 2),
    ("non-ascii-name", "hmmsim-scenario 1\nopen \u00e9 0\n", 2),
    ("cr-inside-line", H + b"open d\r0\n", 2),
    ("cr-before-comment", H + b"open d 0\r# c\n", 2),
    ("two-trailing-cr", H + b"open d 0\r\r\n", 2),
    ("vertical-tab", H + b"open d\x0b0\n", 2),
    ("nbsp", "hmmsim-scenario 1\nopen d\u00a00\n", 2),
    ("hash-inside-token", H + b"open d#x 0\n", 2),
    # Numbers.
    ("npages-negative", H + b"file f -1\n", 2),
    ("npages-too-big", H + b"file f 4194305\n", 2),
    ("npages-plus", H + b"file f +3\n", 2),
    ("npages-hex", H + b"file f 0x10\n", 2),
    ("npages-exponent", H + b"file f 1e3\n", 2),
    ("npages-unicode-digit", "hmmsim-scenario 1\nfile f \u0661\n", 2),
    ("npages-huge", H + b"file f " + b"9" * 5000 + b"\n", 2),
    ("off-too-big", H + b"file f 1\npread f 4194305 1\n", 3),
    ("dev-too-big", H + b"open d 1048577\n", 2),
    ("dev-negative", H + b"open d -1\n", 2),
    ("dflags-too-big", H + b"open d 0\ndflags d 1099511627777\n", 3),
    ("dflags-negative", H + b"open d 0\ndflags d -1\n", 3),
    ("seed-too-big", H + b"file f 1\npwrite f 0 1 9223372036854775808\n", 3),
    ("seed-too-small", H + b"file f 1\npwrite f 0 1 -9223372036854775809\n", 3),
    ("seed-huge-negative", H + b"file f 1\npwrite f 0 1 -" + b"0" * 30 + b"1" * 30 + b"\n", 3),
    ("seed-plus", H + b"file f 1\npwrite f 0 1 +1\n", 3),
    ("seed-minus-only", H + b"file f 1\npwrite f 0 1 -\n", 3),
    ("seed-double-minus", H + b"file f 1\npwrite f 0 1 --1\n", 3),
    ("seed-hex", H + b"file f 1\npwrite f 0 1 0x1\n", 3),
    # align=.
    ("align-3", H + b"mmap a 1 rw private,anon align=3\n", 2),
    ("align-524288", H + b"mmap a 1 rw private,anon align=524288\n", 2),
    ("align-0", H + b"mmap a 1 rw private,anon align=0\n", 2),
    ("align-empty", H + b"mmap a 1 rw private,anon align=\n", 2),
    ("align-plus", H + b"mmap a 1 rw private,anon align=+4\n", 2),
    ("align-hex", H + b"mmap a 1 rw private,anon align=0x10\n", 2),
    ("align-bare-number", H + b"mmap a 1 rw private,anon 512\n", 2),
    ("align-misspelt", H + b"mmap a 1 rw private,anon alignment=4\n", 2),
    ("align-huge", H + b"mmap a 1 rw private,anon align=" + b"1" + b"0" * 40 + b"\n", 2),
    ("align-then-extra", H + b"mmap a 1 rw private,anon align=4 x\n", 2),
    # mmap FLAGS.
    ("flags-out-of-order", H + b"mmap a 1 rw anon,private\n", 2),
    ("flags-hugetlb-middle", H + b"mmap a 1 rw private,hugetlb,anon\n", 2),
    ("flags-duplicate-hugetlb", H + b"mmap a 1 rw private,anon,hugetlb,hugetlb\n", 2),
    ("flags-duplicate-share", H + b"mmap a 1 rw private,shared,anon\n", 2),
    ("flags-share-only", H + b"mmap a 1 rw private\n", 2),
    ("flags-empty-part", H + b"mmap a 1 rw private,,anon\n", 2),
    ("flags-trailing-comma", H + b"mmap a 1 rw private,anon,\n", 2),
    ("flags-leading-comma", H + b"mmap a 1 rw ,private,anon\n", 2),
    ("flags-unknown-word", H + b"mmap a 1 rw private,anon,huge\n", 2),
    ("flags-uppercase", H + b"mmap a 1 rw PRIVATE,anon\n", 2),
    ("flags-file-no-name", H + b"mmap a 1 rw private,file=\n", 2),
    ("flags-file-bare", H + b"mmap a 1 rw private,file\n", 2),
    ("flags-dev-bare", H + b"mmap a 1 rw private,dev\n", 2),
    ("flags-file-bad-name", H + b"mmap a 1 rw private,file=1f\n", 2),
    ("flags-anon-with-name", H + b"mmap a 1 rw private,anon=x\n", 2),
    ("flags-hugetlb-separate-token", H + b"mmap a 1 rw private,anon hugetlb\n", 2),
    # PROT and ADVICE.
    ("prot-unknown", H + b"mmap a 1 w private,anon\n", 2),
    ("prot-uppercase", H + b"mmap a 1 RW private,anon\n", 2),
    ("prot-wr", H + b"mmap a 1 rw private,anon\nmprotect a 0 1 wr\n", 3),
    ("advice-unknown", H + b"mmap a 1 rw private,anon\nmadvise a 0 1 willneed\n", 3),
    ("advice-uppercase", H + b"mmap a 1 rw private,anon\nmadvise a 0 1 DONTNEED\n", 3),
    # Ops and arity.
    ("unknown-op", H + b"mmapp a 1 rw private,anon\n", 2),
    ("op-uppercase", H + b"OPEN d 0\n", 2),
    ("close-no-operand", H + b"close\n", 2),
    ("close-two-operands", H + b"close d e\n", 2),
    ("munmap-too-few", H + b"munmap a 0\n", 2),
    ("fill-no-seed", H + b"fill a 0 1\n", 2),
    ("touch-with-seed", H + b"touch a 0 1 1\n", 2),
    ("dwrite-no-seed", H + b"dwrite d a 0 1\n", 2),
    ("mmap-too-few", H + b"mmap a 1 rw\n", 2),
    ("mremap-too-few", H + b"mremap a b\n", 2),
    ("mremap-bad-4th", H + b"mremap a b 1 unmap\n", 2),
    ("mremap-too-many", H + b"mremap a b 1 dontunmap x\n", 2),
    ("fork-operand", H + b"fork 1\nendfork\n", 2),
    ("endfork-operand", H + b"fork\nendfork 1\nendfork\n", 3),
    ("endfork-operand-leaves-fork-open", H + b"fork\nendfork 1\n", 2),
    # Name syntax.
    ("name-digit-first", H + b"open 1d 0\n", 2),
    ("name-dash", H + b"open d-e 0\n", 2),
    ("name-dot", H + b"fill a.b 0 1 1\n", 2),
    ("mremap-new-bad", H + b"mremap a 9 1\n", 2),
    # fork / endfork structure.
    ("endfork-without-fork", H + b"endfork\n", 2),
    ("endfork-extra", H + b"fork\nendfork\nendfork\n", 4),
    ("unclosed-fork", H + b"open d 0\nfork\nopen e 1\n", 3),
    ("unclosed-empty-fork", H + b"fork", 2),
    ("nested-unclosed-outer", H + b"fork\nfork\nendfork\n", 2),
    ("nested-both-unclosed", H + b"fork\nfork\n", 2),
    ("unclosed-after-closed", H + b"fork\nendfork\nfork\nfork\nendfork\n", 4),
    # Several errors: the smallest line wins.
    ("first-of-two-errors", H + b"bogus\nalso bogus\n", 2),
    ("error-inside-closed-fork", H + b"fork\nbogus\nendfork\n", 3),
    ("unclosed-fork-before-error", H + b"fork\nbogus\n", 2),
    ("error-before-unclosed-fork", H + b"bogus\nfork\n", 2),
    ("endfork-after-error-closes-inner", H + b"fork\nbogus\nfork\nendfork\n", 2),
    ("endfork-after-error-closes-outer", H + b"fork\nbogus\nfork\nendfork\nendfork # c\n", 3),
    ("bad-endfork-after-error", H + b"fork\nbogus\nendfork x\n", 2),
    ("utf8-error-inside-closed-fork", H + b"fork\n\xff\nendfork\n", 3),
    ("header-error-wins", b"fork\nhmmsim-scenario 1\n", 1),
]


@pytest.mark.parametrize(("data", "line"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_parse_scenario_error_line(data: bytes | str, line: int) -> None:
    assert parse_error_line(data) == line


def test_scenario_parse_error_message() -> None:
    with pytest.raises(ScenarioParseError, match=r"^line 2: unknown op 'bogus'$") as excinfo:
        parse_scenario(H + b"bogus\n")
    assert isinstance(excinfo.value, Exception)
    assert excinfo.value.line == 2


# --- names ----------------------------------------------------------------------------------


def test_parse_scenario_name_used_before_definition() -> None:
    text = "fill a 0 1 1\nmmap a 1 rw private,anon\nfill a 0 1 1\nclose d\nopen d 0\nclose d\n"
    assert unknown_flags(text) == [True, False, False, True, False, False]


def test_parse_scenario_close_keeps_name() -> None:
    assert unknown_flags("open d 0\nclose d\nclose d\ndread d a 0 1\n") == [
        False, False, False, True,
    ]


def test_parse_scenario_mremap_names() -> None:
    text = "mremap a a 1\nmmap a 1 rw private,anon\nmremap a b 1\nfill b 0 1 1\nmremap c b 1\n"
    assert unknown_flags(text) == [True, False, False, False, True]


def test_parse_scenario_mmap_backing_names() -> None:
    text = (
        "mmap a 1 rw private,file=f\nmmap b 1 rw shared,dev=d\n"
        "file f 1\nopen d 0\nmmap a 1 rw private,file=f\nmmap b 1 rw shared,dev=d\n"
    )
    assert unknown_flags(text) == [True, True, False, False, False, False]


def test_parse_scenario_unknown_command_still_defines() -> None:
    # A command with an unknown name still binds what it defines (the runner stops there).
    assert unknown_flags("mmap a 1 rw private,file=f\nfill a 0 1 1\n") == [True, False]


def test_parse_scenario_fork_scoping() -> None:
    text = (
        "mmap a 1 rw private,anon\n"
        "fork\n"
        "fill a 0 1 1\n"         # outer name visible inside
        "mmap b 1 rw private,anon\n"
        "open d 0\n"
        "fork\n"
        "fill b 0 1 1\n"         # defined in the enclosing fork
        "file f 1\n"
        "endfork\n"
        "pread f 0 1\n"          # f died with the inner fork
        "dread d b 0 1\n"
        "mmap a 2 r private,anon\n"  # rebinding an outer name
        "endfork\n"
        "fill a 0 1 1\n"         # a was defined outside: still known
        "fill b 0 1 1\n"         # b, d died with the fork
        "close d\n"
    )
    assert unknown_flags(text) == [
        False, False, False, False, False, False, True, False, False, False, True, True,
    ]


def test_parse_scenario_separate_namespaces() -> None:
    text = (
        "open a 0\nfill a 0 1 1\npread a 0 1\n"            # a is a handle only
        "mmap r 1 rw private,anon\nclose r\npread r 0 1\n"  # r is a region only
        "file f 1\nfill f 0 1 1\nclose f\npread f 0 1\n"   # f is a file only
        "mmap a 1 rw private,anon\nfill a 0 1 1\nclose a\n"  # a is now both
    )
    assert unknown_flags(text) == [
        False, True, True, False, True, True, False, True, True, False, False, False, False,
    ]


def test_parse_scenario_device_command_names() -> None:
    text = (
        "dread d a 0 1\nopen d 0\ndread d a 0 1\nmmap a 1 rw private,anon\n"
        "dwrite d a 0 1 1\ndmigrate d a 0 1\ndmigrate_sys d a 0 1\ndsnapshot d a 0 1\n"
        "dexclusive d a 0 1\ndcheck_exclusive d a 0 1\ndrelease d\ndflags d 1\n"
        "dsnapshot e a 0 1\n"
    )
    assert unknown_flags(text) == [True, False, True] + [False] * 9 + [True]


# --- property: rendered valid commands parse back -------------------------------------------

NAMES = st.sampled_from(["a", "b", "d", "f", "_x", "Z9"])
NUMBER_KINDS = {
    "count": st.integers(0, 1 << 22),
    "dev": st.integers(0, 1 << 20),
    "value": st.integers(0, 1 << 40),
    "seed": st.integers(-(1 << 63), (1 << 63) - 1),
}
WORD_KINDS = {
    "prot": st.sampled_from(["none", "r", "rw"]),
    "advice": st.sampled_from(["hugepage", "nohugepage", "dontneed", "free"]),
}
# Operands of the fixed-arity ops: a number kind, a word kind, a namespace (a use) or
# "new " + namespace (a definition).
SIGNATURES = {
    "munmap": ("region", "count", "count"),
    "mprotect": ("region", "count", "count", "prot"),
    "madvise": ("region", "count", "count", "advice"),
    "fill": ("region", "count", "count", "seed"),
    "touch": ("region", "count", "count"),
    "read": ("region", "count", "count"),
    "check": ("region", "count", "count", "seed"),
    "file": ("new file", "count"),
    "pwrite": ("file", "count", "count", "seed"),
    "pread": ("file", "count", "count"),
    "open": ("new handle", "dev"),
    "close": ("handle",),
    "drelease": ("handle",),
    "dflags": ("handle", "value"),
    "dread": ("handle", "region", "count", "count"),
    "dwrite": ("handle", "region", "count", "count", "seed"),
    "dmigrate": ("handle", "region", "count", "count"),
    "dmigrate_sys": ("handle", "region", "count", "count"),
    "dsnapshot": ("handle", "region", "count", "count"),
    "dexclusive": ("handle", "region", "count", "count"),
    "dcheck_exclusive": ("handle", "region", "count", "count"),
}


@st.composite
def number_tokens(draw: st.DrawFn, kind: str) -> tuple[str, int]:
    """A number of ``kind`` and its decimal text, sometimes with leading zeros."""
    value = draw(NUMBER_KINDS[kind])
    zeros = "0" * draw(st.integers(0, 2))
    return ("-" if value < 0 else "") + zeros + str(abs(value)), value


@st.composite
def command_lines(draw: st.DrawFn) -> tuple:
    """("cmd", tokens, op, args, uses, defs) of one valid command line."""
    op = draw(st.sampled_from(["mmap", "mremap", *SIGNATURES]))
    uses: list[tuple[str, str]] = []
    defs: list[tuple[str, str]] = []
    if op == "mmap":
        name = draw(NAMES)
        npages_text, npages = draw(number_tokens("count"))
        prot = draw(WORD_KINDS["prot"])
        share = draw(st.sampled_from(["private", "shared"]))
        backing = draw(st.sampled_from(["anon", "file", "dev"]))
        backing_name = None if backing == "anon" else draw(NAMES)
        hugetlb = draw(st.booleans())
        align = draw(st.none() | st.integers(0, 18).map(lambda k: 1 << k))
        flags = [share, backing if backing_name is None else f"{backing}={backing_name}"]
        flags += ["hugetlb"] if hugetlb else []
        tokens = [op, name, npages_text, prot, ",".join(flags)]
        tokens += [] if align is None else [f"align={align}"]
        args = (name, npages, prot, share, backing, backing_name, hugetlb, align or 1)
        if backing_name is not None:
            uses.append(("file" if backing == "file" else "handle", backing_name))
        defs.append(("region", name))
    elif op == "mremap":
        name, new = draw(NAMES), draw(NAMES)
        npages_text, npages = draw(number_tokens("count"))
        dontunmap = draw(st.booleans())
        tokens = [op, name, new, npages_text] + (["dontunmap"] if dontunmap else [])
        args = (name, new, npages, dontunmap)
        uses.append(("region", name))
        defs.append(("region", new))
    else:
        tokens, values = [op], []
        for kind in SIGNATURES[op]:
            if kind in NUMBER_KINDS:
                text, value = draw(number_tokens(kind))
            elif kind in WORD_KINDS:
                text = value = draw(WORD_KINDS[kind])
            else:
                text = value = draw(NAMES)
                if kind.startswith("new "):
                    defs.append((kind[4:], text))
                else:
                    uses.append((kind, text))
            tokens.append(text)
            values.append(value)
        args = tuple(values)
    return ("cmd", tokens, op, args, uses, defs)


PROGRAMS = st.recursive(
    st.lists(command_lines(), max_size=4),
    lambda children: st.lists(
        command_lines() | children.map(lambda body: ("fork", body)), max_size=4
    ),
    max_leaves=25,
)
SEPARATORS = st.sampled_from([" ", "\t", "  ", " \t "])
COMMENTS = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\0"), max_size=8
)


def render_line(data: st.DataObject, tokens: list[str]) -> str:
    """Join tokens with random spaces/tabs, maybe a trailing comment and a \\r."""
    text = data.draw(st.sampled_from(["", " ", "\t"]))
    for i, token in enumerate(tokens):
        text += (data.draw(SEPARATORS) if i else "") + token
    if data.draw(st.booleans()):
        text += data.draw(st.sampled_from(["", " ", "\t"])) + "#" + data.draw(COMMENTS)
    return text + data.draw(st.sampled_from(["", "\r"]))


def render(
    data: st.DataObject, program: list, names: dict[str, set[str]], lines: list[str]
) -> list:
    """Append the program's lines; return the expected AST as nested tuples."""
    expected: list = []
    for item in program:
        for _ in range(data.draw(st.integers(0, 1))):
            lines.append(data.draw(st.sampled_from(["", " \t", "# note", "\t# fork"])))
        if item[0] == "fork":
            fork_line = len(lines) + 1
            lines.append(render_line(data, ["fork"]))
            inner = {namespace: set(bound) for namespace, bound in names.items()}
            body = render(data, item[1], inner, lines)
            lines.append(render_line(data, ["endfork"]))
            expected.append(("fork", fork_line, len(lines), tuple(body)))
        else:
            _, tokens, op, args, uses, defs = item
            unknown = any(name not in names[namespace] for namespace, name in uses)
            for namespace, name in defs:
                names[namespace].add(name)
            lines.append(render_line(data, tokens))
            expected.append((len(lines), op, args, unknown))
    return expected


def as_tuples(body: tuple) -> list:
    """The AST in render()'s nested-tuple form."""
    return [
        ("fork", n.line, n.end_line, tuple(as_tuples(n.body)))
        if isinstance(n, Fork)
        else (n.line, n.op, n.args, n.unknown_name)
        for n in body
    ]


@settings(max_examples=300, deadline=None)
@given(program=PROGRAMS, data=st.data(), final_newline=st.booleans())
def test_parse_scenario_roundtrip(program: list, data: st.DataObject, final_newline: bool) -> None:
    lines = [data.draw(st.sampled_from(["", "# header next"]))]
    lines.append(render_line(data, ["hmmsim-scenario", "1"]))
    names: dict[str, set[str]] = {"region": set(), "file": set(), "handle": set()}
    expected = render(data, program, names, lines)
    text = "\n".join(lines) + ("\n" if final_newline else "")
    assert as_tuples(parse_scenario(text.encode()).body) == expected
    assert as_tuples(parse_scenario(text).body) == expected

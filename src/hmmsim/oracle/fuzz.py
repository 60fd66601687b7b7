"""Random scenarios over the whole scenario language, and a fuzz loop that runs them on the
model and on a real kernel and sorts what it finds.

:func:`generate` makes a valid scenario from a seed: regions (private/shared anonymous,
tmpfs files, hugetlb, THP-aligned with MADV_HUGEPAGE), CPU commands, mprotect/madvise/
munmap/mremap, fork blocks, every device command on the four devices (private 0/1,
coherent 2/3), ``dflags``, ``drelease`` and ``uffd``. Offsets and sizes mostly stay inside
the regions; some run past them, to exercise the error paths. The same seed gives the same
scenario.

Each scenario has a *theme* (:data:`THEMES`), which weights what it does:

``mixed``
    the whole language, evenly.
``thp-device``
    starts with a handle on a device (coherent half of the time) and a filled THP region;
    then mostly device commands over THP-sized or THP-aligned spans (whole THP, first page,
    half), ``drelease``/``dflags`` and forks with device commands inside: the sequences where
    device-THP migration, splitting and sharing meet (conventions items 26-28 were found in
    such sequences).
``fork-device``
    like ``mixed`` but a fork early on, device commands in both processes and small regions
    migrated from untouched (pte_none) pages.

:func:`uses_device_memory` tells whether a scenario's device memory could outlive it (a
coherent device's fixed range; any device's chunks on a kernel with test_hmm built in), so a
runner can give it a boot of its own."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .compare import Difference, compare_results
from .results import RunResult

__all__ = ("GROUPS", "THEMES", "Finding", "FuzzReport", "fuzz", "generate", "group_results", "uses_device_memory")

_SIZES = (1, 2, 3, 4, 8, 16, 33, 64)
_DEV_CMDS = ("dread", "dwrite", "dmigrate", "dmigrate_sys", "dsnapshot", "dexclusive",
             "dcheck_exclusive", "dread_unlocked")
#: scenario themes and how often each is drawn
THEMES: dict[str, int] = {"mixed": 5, "thp-device": 4, "fork-device": 2}
#: command weights per theme (fill, check, read, touch, mprotect, madvise, munmap, mremap,
#: fork, dev, dflags, drelease, uffd)
_OPS = ("fill", "check", "read", "touch", "mprotect", "madvise", "munmap", "mremap", "fork",
        "dev", "dflags", "drelease", "uffd")
_WEIGHTS: dict[str, tuple[int, ...]] = {
    "mixed": (10, 4, 3, 3, 3, 3, 2, 2, 2, 14, 1, 1, 1),
    "thp-device": (3, 1, 1, 1, 1, 1, 1, 1, 5, 24, 4, 5, 0),
    "fork-device": (6, 3, 2, 2, 1, 1, 1, 1, 4, 20, 2, 2, 1),
}
#: device command weights per theme (in :data:`_DEV_CMDS` order)
_DEV_WEIGHTS: dict[str, tuple[int, ...]] = {
    "mixed": (1, 1, 1, 1, 1, 1, 1, 1),
    "thp-device": (2, 3, 10, 4, 2, 1, 1, 2),
    "fork-device": (3, 4, 6, 3, 2, 1, 1, 1),
}
#: spans of a THP-sized region that meet its structure (offset, pages)
_THP_SPANS = ((0, 512), (0, 512), (0, 1), (0, 256), (256, 256), (511, 1), (1, 2))


@dataclass
class _Gen:
    rng: random.Random
    regions: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    handles: list[str] = field(default_factory=list)
    n: int = 0
    lines: list[str] = field(default_factory=list)
    theme: str = "mixed"
    thp: set[str] = field(default_factory=set)

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def span(self, region: str) -> tuple[int, int]:
        size = self.regions[region]
        r = self.rng
        if self.theme != "mixed" and region in self.thp and r.random() < 0.7:
            off, n = r.choice(_THP_SPANS)
            if off < size:
                return off, min(n, size - off)
        if r.random() < 0.1:  # past the end: error paths
            return r.randrange(size), r.choice(_SIZES) + size
        off = r.randrange(size)
        return off, r.randint(1, size - off)

    def mmap(self) -> None:
        r = self.rng
        name = self.name("r")
        kind = r.choices(("anon", "shared", "file", "thp", "hugetlb"), (5, 2, 1, 3, 1))[0]
        prot = r.choices(("rw", "r", "none"), (8, 1, 1))[0]
        if kind == "thp":
            npages = r.choice((512, 1024))
            self.lines.append(f"mmap {name} {npages} {prot} private,anon align=512")
            self.lines.append(f"madvise {name} 0 {npages} hugepage")
            self.thp.add(name)
        elif kind == "hugetlb":
            npages = 512
            self.lines.append(f"mmap {name} {npages} {prot} {r.choice(('private', 'shared'))},anon,hugetlb align=512")
        elif kind == "file" and self.files:
            npages = r.choice(_SIZES)
            f = r.choice(self.files)
            self.lines.append(f"mmap {name} {npages} {prot} {r.choice(('private', 'shared'))},file={f}")
        else:
            npages = r.choice(_SIZES)
            self.lines.append(f"mmap {name} {npages} {prot} {'shared' if kind == 'shared' else 'private'},anon")
        self.regions[name] = npages

    def command(self, depth: int) -> None:
        r = self.rng
        if not self.regions or r.random() < 0.12:
            if r.random() < 0.2:
                f = self.name("f")
                self.lines.append(f"file {f} {r.choice(_SIZES)}")
                self.files.append(f)
            self.mmap()
            return
        if not self.handles or r.random() < 0.05:
            h = self.name("h")
            self.lines.append(f"open {h} {r.randrange(4)}")
            self.handles.append(h)
            return
        region = r.choice(sorted(self.regions))
        off, npages = self.span(region)
        h = r.choice(self.handles)
        weights = list(_WEIGHTS[self.theme])
        if depth >= 2:
            weights[_OPS.index("fork")] = 0
        op = r.choices(_OPS, weights)[0]
        seed = r.randrange(100)
        if op in ("fill", "check"):
            self.lines.append(f"{op} {region} {off} {npages} {seed}")
        elif op in ("read", "touch"):
            self.lines.append(f"{op} {region} {off} {npages}")
        elif op == "mprotect":
            self.lines.append(f"mprotect {region} {off} {npages} {r.choice(('none', 'r', 'rw'))}")
        elif op == "madvise":
            self.lines.append(f"madvise {region} {off} {npages} {r.choice(('dontneed', 'free', 'hugepage', 'nohugepage'))}")
        elif op == "munmap":
            self.lines.append(f"munmap {region} {off} {npages}")
        elif op == "mremap":
            new = self.name("r")
            n = max(1, min(npages, self.regions[region]))
            self.lines.append(f"mremap {region} {new} {n}{' dontunmap' if r.random() < 0.3 else ''}")
            self.regions[new] = n
        elif op == "fork":
            saved = (dict(self.regions), list(self.files), list(self.handles), set(self.thp))
            self.lines.append("fork")
            for _ in range(r.randint(1, 4)):
                self.command(depth + 1)
            self.lines.append("endfork")
            self.regions, self.files, self.handles, self.thp = saved
        elif op == "dflags":
            self.lines.append(f"dflags {h} {r.choice((0, 1))}")
        elif op == "drelease":
            self.lines.append(f"drelease {h}")
        elif op == "uffd":
            self.lines.append(f"uffd {region} {off} {npages} {seed}")
        else:
            cmd = r.choices(_DEV_CMDS, _DEV_WEIGHTS[self.theme])[0]
            extra = f" {seed}" if cmd == "dwrite" else ""
            self.lines.append(f"{cmd} {h} {region} {off} {npages}{extra}")


def _prologue(g: _Gen) -> None:
    """The opening of a themed scenario: a handle, and a filled THP region (``thp-device``)
    or a small region and a fork (``fork-device``)."""
    r = g.rng
    h = g.name("h")
    g.lines.append(f"open {h} {r.choice((0, 1, 2, 3)) if r.random() < 0.5 else r.choice((2, 3))}")
    g.handles.append(h)
    if g.theme == "thp-device":
        a = g.name("r")
        g.lines += [f"mmap {a} 512 rw private,anon align=512", f"madvise {a} 0 512 hugepage"]
        if r.random() < 0.8:
            g.lines.append(f"fill {a} 0 512 {r.randrange(100)}")
        g.regions[a] = 512
        g.thp.add(a)
    else:
        a = g.name("r")
        n = r.choice((4, 8, 16))
        g.lines.append(f"mmap {a} {n} rw private,anon")
        g.regions[a] = n


def generate(seed: int, length: int | None = None, theme: str | None = None) -> list[str]:
    """The body lines of random scenario *seed* (about *length* commands); *theme* (one of
    :data:`THEMES`) is drawn from the seed unless given."""
    rng = random.Random(seed)
    g = _Gen(rng, theme=theme or rng.choices(tuple(THEMES), tuple(THEMES.values()))[0])
    if g.theme != "mixed":
        _prologue(g)
    for _ in range(length if length is not None else g.rng.randint(6, 20)):
        g.command(0)
    return g.lines


def uses_device_memory(lines: list[str], coherent_only: bool = True) -> bool:
    """Whether a scenario opens a device whose memory outlives it: a coherent device (2, 3:
    its fixed range stays taken by what the scenario left there), or any device when
    *coherent_only* is false (test_hmm built in keeps every device's chunks)."""
    for ln in lines:
        w = ln.split("#", 1)[0].split()
        if len(w) >= 3 and w[0] == "open" and (not coherent_only or w[2] in ("2", "3")):
            return True
    return False


_KERNEL_ERRORS = ("kernel-oops", "kernel-hang")
#: the groups of a fuzz report, in the order they are printed
GROUPS = ("model-differs", "kernel-crashes", "kernel-hangs", "kernel-warns")


@dataclass
class Finding:
    """One scenario's finding: what differs (or the kernel's run) and whether the model
    *knows* it (it reports ``kernel-oops``/``kernel-hang`` exactly where the kernel crashed
    or hung: a known kernel bug, not a model error)."""

    name: str
    what: Difference | RunResult
    known: bool = False

    @property
    def where(self) -> str:
        """The command and line it happened at (or the kernel's outcome)."""
        if isinstance(self.what, Difference):
            return f"{self.what.op} line {self.what.line}"
        return self.what.outcome

    @property
    def detail(self) -> str:
        """For a known bug, the model's message; for a WARN, the kernel's first WARN line."""
        if isinstance(self.what, Difference) and self.known and self.what.a is not None:
            return str(self.what.a.get("message", ""))
        if isinstance(self.what, RunResult) and self.what.events:
            return self.what.events[0].message
        return ""


@dataclass
class FuzzReport:
    """What a fuzz run found, by group (:data:`GROUPS`): ``model-differs``,
    ``kernel-crashes``, ``kernel-hangs`` (each finding marked *known* when the model reports
    that crash or hang itself), ``kernel-warns``; ``agree`` counts the scenarios where
    nothing happened."""

    groups: dict[str, list[Finding]] = field(default_factory=dict)
    agree: int = 0

    def add(self, group: str, name: str, what: Difference | RunResult, known: bool = False) -> None:
        self.groups.setdefault(group, []).append(Finding(name, what, known))

    @property
    def unexplained(self) -> int:
        """Findings the model does not account for (model differences, unknown crashes and
        hangs, WARNs)."""
        return sum(1 for items in self.groups.values() for f in items if not f.known)

    def format(self) -> str:
        """The grouped report ``hmmsim fuzz`` prints."""
        out = []
        for g in GROUPS:
            items = self.groups.get(g, [])
            if not items:
                continue
            known = sum(f.known for f in items)
            note = ""
            if g in ("kernel-crashes", "kernel-hangs"):
                note = f" ({known} known kernel bug{'s' if known != 1 else ''}: the model reports them; " \
                       f"{len(items) - known} not)"
            out.append(f"{g}: {len(items)}{note}")
            for f in items:
                tag = "known kernel bug: " if f.known else ""
                detail = f": {tag}{f.detail}" if (f.detail or tag) else ""
                out.append(f"  {f.name}: {f.where}{detail}")
        return "\n".join(out)


def fuzz(seed: int, count: int, run_model: Callable[[dict[str, str]], dict[str, RunResult]],
         run_kernel: Callable[[dict[str, str]], dict[str, RunResult]],
         length: int | None = None, theme: str | None = None,
         fresh_boot: Callable[[list[str]], bool] | None = uses_device_memory) -> tuple[FuzzReport, dict[str, str]]:
    """Generate *count* scenarios from *seed* (all of *theme* if given), run them on both
    sides and group the results. Scenarios for which *fresh_boot* says so get a kernel run
    (a boot) of their own; the rest share one. Returns the report and the texts by name."""
    from .minimize import scenario_text
    bodies = {f"fuzz-{seed}-{i}.hmm": generate(seed * 100_003 + i, length, theme) for i in range(count)}
    texts = {n: scenario_text(b) for n, b in bodies.items()}
    model = run_model(texts)
    alone = [n for n in texts if fresh_boot is not None and fresh_boot(bodies[n])]
    shared = {n: t for n, t in texts.items() if n not in alone}
    kern: dict[str, RunResult] = run_kernel(shared) if shared else {}
    for n in alone:
        kern.update(run_kernel({n: texts[n]}))
    return group_results(list(texts), model, kern), texts


def group_results(names: list[str], model: dict[str, RunResult], kern: dict[str, RunResult]) -> FuzzReport:
    """Sort the scenarios *names* into a :class:`FuzzReport` from both sides' results."""
    rep = FuzzReport()
    _same, diffs = compare_results({n: model[n] for n in names}, kern)
    bad = {d.name: d for d in diffs}
    for name in names:
        k = kern.get(name)
        d = bad.get(name)
        if d is not None:
            if d.kind == "known-kernel-bug" or (k is not None and k.outcome in ("crash", "hang")
                                                and d.a is not None and d.a.get("error") in _KERNEL_ERRORS):
                # the model reports the crash/hang; the kernel may run a few more commands on
                # corrupted state before it oopses (conventions item 27)
                rep.add("kernel-crashes" if k is not None and k.outcome == "crash" else "kernel-hangs", name, d,
                        known=True)
            else:
                rep.add({"kernel-crash": "kernel-crashes", "kernel-hang": "kernel-hangs"}.get(d.kind, "model-differs"),
                        name, d)
        elif k is not None and k.outcome in ("crash", "hang"):
            # the model printed the same lines and reports the same crash/hang
            known = any(r.get("error") in _KERNEL_ERRORS for r in model[name].records)
            rep.add("kernel-crashes" if k.outcome == "crash" else "kernel-hangs", name, k, known=known)
        else:
            rep.agree += 1
        if k is not None and k.outcome == "warn":
            rep.add("kernel-warns", name, k)
    return rep

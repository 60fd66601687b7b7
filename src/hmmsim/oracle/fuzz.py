"""Random scenarios over the whole scenario language, and a fuzz loop that runs them on the
model and on a real kernel and sorts what it finds.

:func:`generate` makes a valid scenario from a seed: regions (private/shared anonymous,
tmpfs files, hugetlb, THP-aligned with MADV_HUGEPAGE), CPU commands, mprotect/madvise/
munmap/mremap, fork blocks, every device command on the four devices (private 0/1,
coherent 2/3), ``dflags``, ``drelease`` and ``uffd``. Offsets and sizes mostly stay inside
the regions; some run past them, to exercise the error paths. The same seed gives the same
scenario."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .compare import Difference, compare_results
from .results import RunResult

__all__ = ("FuzzReport", "fuzz", "generate")

_SIZES = (1, 2, 3, 4, 8, 16, 33, 64)
_DEV_CMDS = ("dread", "dwrite", "dmigrate", "dmigrate_sys", "dsnapshot", "dexclusive",
             "dcheck_exclusive", "dread_unlocked")


@dataclass
class _Gen:
    rng: random.Random
    regions: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    handles: list[str] = field(default_factory=list)
    n: int = 0
    lines: list[str] = field(default_factory=list)

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def span(self, region: str) -> tuple[int, int]:
        size = self.regions[region]
        r = self.rng
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
        op = r.choices(
            ("fill", "check", "read", "touch", "mprotect", "madvise", "munmap", "mremap", "fork",
             "dev", "dflags", "drelease", "uffd"),
            (10, 4, 3, 3, 3, 3, 2, 2, 2 if depth < 2 else 0, 14, 1, 1, 1))[0]
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
            saved = (dict(self.regions), list(self.files), list(self.handles))
            self.lines.append("fork")
            for _ in range(r.randint(1, 4)):
                self.command(depth + 1)
            self.lines.append("endfork")
            self.regions, self.files, self.handles = saved
        elif op == "dflags":
            self.lines.append(f"dflags {h} {r.choice((0, 1))}")
        elif op == "drelease":
            self.lines.append(f"drelease {h}")
        elif op == "uffd":
            self.lines.append(f"uffd {region} {off} {npages} {seed}")
        else:
            cmd = r.choice(_DEV_CMDS)
            extra = f" {seed}" if cmd == "dwrite" else ""
            self.lines.append(f"{cmd} {h} {region} {off} {npages}{extra}")


def generate(seed: int, length: int | None = None) -> list[str]:
    """The body lines of random scenario *seed* (about *length* commands)."""
    g = _Gen(random.Random(seed))
    for _ in range(length if length is not None else g.rng.randint(6, 20)):
        g.command(0)
    return g.lines


@dataclass
class FuzzReport:
    """What a fuzz run found, by group: ``model-differs``, ``kernel-warns``,
    ``kernel-crashes``, ``kernel-hangs``, ``known-kernel-bug``; ``agree`` counts the
    scenarios where nothing happened."""

    groups: dict[str, list[tuple[str, Difference | RunResult]]] = field(default_factory=dict)
    agree: int = 0

    def add(self, group: str, name: str, what: Difference | RunResult) -> None:
        self.groups.setdefault(group, []).append((name, what))


def fuzz(seed: int, count: int, run_model: Callable[[dict[str, str]], dict[str, RunResult]],
         run_kernel: Callable[[dict[str, str]], dict[str, RunResult]],
         length: int | None = None) -> tuple[FuzzReport, dict[str, str]]:
    """Generate *count* scenarios from *seed*, run them on both sides and group the
    results. Returns the report and the scenario texts by name."""
    from .minimize import scenario_text
    texts = {f"fuzz-{seed}-{i}.hmm": scenario_text(generate(seed * 100_003 + i, length)) for i in range(count)}
    model = run_model(texts)
    kern = run_kernel(texts)
    rep = FuzzReport()
    _same, diffs = compare_results(model, kern)
    bad = {d.name: d for d in diffs}
    for name in texts:
        k = kern.get(name)
        d = bad.get(name)
        if d is not None:
            group = {"known-kernel-bug": "known-kernel-bug", "kernel-crash": "kernel-crashes",
                     "kernel-hang": "kernel-hangs"}.get(d.kind, "model-differs")
            rep.add(group, name, d)
        elif k is not None and k.outcome in ("crash", "hang"):
            rep.add("kernel-crashes" if k.outcome == "crash" else "kernel-hangs", name, k)
        else:
            rep.agree += 1
        if k is not None and k.outcome == "warn":
            rep.add("kernel-warns", name, k)
    return rep, texts

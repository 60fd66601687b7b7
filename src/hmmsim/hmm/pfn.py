"""``include/linux/hmm.h``: the ``HMM_PFN_*`` bits of each release, ``struct hmm_range``
and the helpers drivers use on output entries.

The module constants name the 7.3 (default) layout; :class:`HmmPfnLayout` holds the
layout of any modelled release (:func:`hmm_pfn_layout`): 6.12 has the map order at bit 56
(``HMM_PFN_FLAGS = 0xFF << 56``) and no sticky bits; 7.3 added ``HMM_PFN_DMA_MAPPED``,
``HMM_PFN_P2PDMA`` and ``HMM_PFN_P2PDMA_BUS`` at 60..58 (``HMM_PFN_INOUT_FLAGS``, carried
from input to output) and moved the order to bit 53.

>>> from hmmsim.kernel.profile import get_profile
>>> decode_hmm_pfn((1 << 63) | (9 << 56) | 0x42, hmm_pfn_layout(get_profile("6.12")))
'VALID order=9 pfn=0x42'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..flags import decode_flags
from ..kernel.mmu_notifier import MmuIntervalNotifier

if TYPE_CHECKING:
    from ..kernel.profile import Profile

__all__ = (
    "HMM_PFN_COMPOUND", "HMM_PFN_DMA_MAPPED", "HMM_PFN_ERROR", "HMM_PFN_FLAGS",
    "HMM_PFN_FLAG_NAMES", "HMM_PFN_INOUT_FLAGS", "HMM_PFN_LAYOUT", "HMM_PFN_MIGRATE",
    "HMM_PFN_MIGRATE_FLAG_NAMES", "HMM_PFN_ORDER_MASK", "HMM_PFN_ORDER_SHIFT",
    "HMM_PFN_P2PDMA", "HMM_PFN_P2PDMA_BUS", "HMM_PFN_REQ_FAULT", "HMM_PFN_REQ_MIGRATE",
    "HMM_PFN_REQ_WRITE", "HMM_PFN_VALID", "HMM_PFN_WRITE", "HMM_RANGE_DEFAULT_TIMEOUT", "HmmPfnLayout", "HmmRange",
    "decode_hmm_pfn", "hmm_pfn_layout", "hmm_pfn_to_map_order", "hmm_pfn_to_pfn",
)

_ULONG = 0xFFFF_FFFF_FFFF_FFFF

HMM_PFN_VALID = 1 << 63
HMM_PFN_WRITE = 1 << 62
HMM_PFN_ERROR = 1 << 61
HMM_PFN_DMA_MAPPED = 1 << 60
HMM_PFN_P2PDMA = 1 << 59
HMM_PFN_P2PDMA_BUS = 1 << 58
HMM_PFN_ORDER_SHIFT = 53
HMM_PFN_ORDER_MASK = 0x1F
HMM_PFN_FLAGS = ~((1 << HMM_PFN_ORDER_SHIFT) - 1) & _ULONG
HMM_PFN_INOUT_FLAGS = HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA | HMM_PFN_P2PDMA_BUS
HMM_PFN_REQ_FAULT = HMM_PFN_VALID
HMM_PFN_REQ_WRITE = HMM_PFN_WRITE
#: the unified fault+migrate walk (profile ``hmm_migrate_on_fault``, not in any release):
#: output "a migration entry was installed" (or, without VALID, "an empty page to fill")
HMM_PFN_MIGRATE = 1 << 57
#: output: the entry stands for a whole PMD-sized folio (or hole), the next 511 are 0
HMM_PFN_COMPOUND = 1 << 56
#: input (``default_flags``): migrate what the walk finds, selected by
#: ``hmm_range.migrate.flags`` | MIGRATE_VMA_SELECT_SYSTEM
HMM_PFN_REQ_MIGRATE = HMM_PFN_MIGRATE
#: milliseconds a driver should keep retrying (``HMM_RANGE_DEFAULT_TIMEOUT``)
HMM_RANGE_DEFAULT_TIMEOUT = 1000

HMM_PFN_FLAG_NAMES: tuple[tuple[str, int], ...] = (
    ("VALID", 63), ("WRITE", 62), ("ERROR", 61), ("DMA_MAPPED", 60), ("P2PDMA", 59),
    ("P2PDMA_BUS", 58),
)
#: the flag names of the series' layout (MIGRATE 57, COMPOUND 56, order from bit 51)
HMM_PFN_MIGRATE_FLAG_NAMES: tuple[tuple[str, int], ...] = HMM_PFN_FLAG_NAMES + (("MIGRATE", 57), ("COMPOUND", 56))


@dataclass(frozen=True, slots=True)
class HmmPfnLayout:
    """The compile-time ``HMM_PFN_*`` layout of one release (``include/linux/hmm.h``).

    :ivar order_shift: ``HMM_PFN_ORDER_SHIFT`` (56 in 6.12, 53 in 7.3)
    :ivar inout_flags: ``HMM_PFN_INOUT_FLAGS``, carried from input to output (0 in 6.12,
        where every output overwrites the whole entry)
    :ivar flag_names: the named flag bits of the release (for :func:`decode_hmm_pfn`)
    """

    order_shift: int
    inout_flags: int
    flag_names: tuple[tuple[str, int], ...]

    @property
    def flags(self) -> int:
        """``HMM_PFN_FLAGS``: every bit from the order up (``0xFF << 56`` in 6.12)."""
        return ~((1 << self.order_shift) - 1) & _ULONG

    def order_flags(self, order: int) -> int:
        """``hmm_pfn_flags_order()``: *order* in the order field."""
        return order << self.order_shift


#: the 7.3 (default) layout, the one the module constants name
HMM_PFN_LAYOUT = HmmPfnLayout(HMM_PFN_ORDER_SHIFT, HMM_PFN_INOUT_FLAGS, HMM_PFN_FLAG_NAMES)


@lru_cache(maxsize=None)
def _layout(order_shift: int, sticky: bool, migrate: bool = False) -> HmmPfnLayout:
    if migrate:
        return HmmPfnLayout(order_shift, HMM_PFN_INOUT_FLAGS, HMM_PFN_MIGRATE_FLAG_NAMES)
    if sticky and order_shift == HMM_PFN_ORDER_SHIFT:
        return HMM_PFN_LAYOUT
    if sticky:
        return HmmPfnLayout(order_shift, HMM_PFN_INOUT_FLAGS, HMM_PFN_FLAG_NAMES)
    return HmmPfnLayout(order_shift, 0, HMM_PFN_FLAG_NAMES[:3])


def hmm_pfn_layout(profile: "Profile") -> HmmPfnLayout:
    """The pfn layout of the release *profile* models (``hmm_pfn_order_shift``,
    ``hmm_pfn_sticky_flags``, ``hmm_migrate_on_fault``: the series' MIGRATE/COMPOUND bits)."""
    return _layout(profile.hmm_pfn_order_shift, profile.hmm_pfn_sticky_flags, profile.hmm_migrate_on_fault)


def hmm_pfn_to_pfn(hmm_pfn: int, layout: HmmPfnLayout = HMM_PFN_LAYOUT) -> int:
    """The pfn of an output entry (``page_to_pfn(hmm_pfn_to_page())``)."""
    return hmm_pfn & ~layout.flags & _ULONG


def hmm_pfn_to_map_order(hmm_pfn: int, layout: HmmPfnLayout = HMM_PFN_LAYOUT) -> int:
    """``hmm_pfn_to_map_order()``: log2 of the CPU mapping size in pages."""
    return (hmm_pfn >> layout.order_shift) & HMM_PFN_ORDER_MASK


def decode_hmm_pfn(hmm_pfn: int, layout: HmmPfnLayout = HMM_PFN_LAYOUT) -> str:
    """``"VALID|WRITE order=9 pfn=0x1234"`` for an output entry."""
    flags = hmm_pfn & (layout.flags & ~(HMM_PFN_ORDER_MASK << layout.order_shift))
    s = decode_flags(flags, layout.flag_names)
    order = hmm_pfn_to_map_order(hmm_pfn, layout)
    if order:
        s += f" order={order}"
    return f"{s} pfn={hmm_pfn_to_pfn(hmm_pfn, layout):#x}"


@dataclass
class HmmRange:
    """``struct hmm_range``: the request and the output array of one call.

    :ivar notifier: ``struct mmu_interval_notifier *``; ``notifier.mm`` is walked
    :ivar notifier_seq: from ``mmu_interval_read_begin()``
    :ivar start: page-aligned start address
    :ivar end: exclusive end address
    :ivar hmm_pfns: ``unsigned long[(end - start) >> PAGE_SHIFT]``: requests in, results out
    :ivar default_flags: request bits applied to every page
    :ivar pfn_flags_mask: which bits of each ``hmm_pfns[i]`` are honoured as requests
    :ivar dev_private_owner: compared with ``page_pgmap(page)->owner``
    :ivar migrate: ``struct migrate_vma *`` (the unified fault+migrate walk, profile
        ``hmm_migrate_on_fault``): with ``HMM_PFN_REQ_MIGRATE`` in ``default_flags`` the
        walk also installs migration entries; ``notifier`` may then be None (the
        "migrate path" of ``migrate_vma_setup()``, the mm is ``migrate.vma.vm_mm``)
    """

    notifier: MmuIntervalNotifier | None
    start: int
    end: int
    hmm_pfns: npt.NDArray[np.uint64]
    notifier_seq: int = 0
    default_flags: int = 0
    pfn_flags_mask: int = 0
    dev_private_owner: Any = None
    migrate: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self) -> HmmPfnLayout:
        """The pfn layout of the kernel the notifier's (or migrate VMA's) mm runs on."""
        mm = self.notifier.mm if self.notifier is not None else self.migrate.vma.vm_mm
        return HMM_PFN_LAYOUT if mm is None else hmm_pfn_layout(mm.sys.profile)

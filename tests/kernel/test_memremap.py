"""``mm/memremap.c``: handing out device pages and device folios."""

from hmmsim.kernel.memremap import page_pgmap, zone_device_folio_init, zone_device_page_init
from hmmsim.kernel.physmem import PG_head, PG_locked
from hmmsim.kernel.system import System


def _free_device_pfn(sys: System, minor: int) -> int:
    """The lowest unused pfn of device *minor*'s first chunk, 512-aligned."""
    pg = sys.dmirror_devices[minor].chunks[0].pagemap
    return pg.start_pfn


def test_zone_device_folio_init_makes_a_locked_order9_folio() -> None:
    sys = System(kernel="7.3")
    head = _free_device_pfn(sys, 0)
    pg = page_pgmap(sys, head)
    used = pg.nr_used
    zone_device_folio_init(sys, head, 9)
    mem = sys.mem
    assert mem.refcount[head] == 1 and not mem.refcount[head + 1:head + 512].any()
    assert mem.order[head] == 9 and mem.flags[head] & PG_head and mem.flags[head] & PG_locked
    assert mem.compound_head(head + 511) == head
    assert pg.nr_used == used + 1


def test_zone_device_page_init_clears_an_earlier_folio() -> None:
    sys = System(kernel="7.3")
    head = _free_device_pfn(sys, 0)
    zone_device_folio_init(sys, head, 9)
    # the driver frees the folio as order-0 pages later handed out one by one
    sys.mem.refcount[head] = 0
    page_pgmap(sys, head).nr_used -= 1
    zone_device_page_init(sys, head + 3)
    mem = sys.mem
    assert mem.order[head + 3] == 0 and mem.compound_head(head + 3) == head + 3
    assert mem.refcount[head + 3] == 1

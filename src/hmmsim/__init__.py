"""hmmsim: an executable model of Linux HMM (Heterogeneous Memory Management).

The kernel-level API mirrors the kernel by name (``hmmsim.hmm.hmm.hmm_range_fault``,
``hmmsim.kernel.mmu_notifier.mmu_interval_read_begin``, ...); the friendly layer is
:class:`System`, :class:`Process`, :class:`Device` and the exceptions of
:mod:`hmmsim.errors`.

>>> import hmmsim
>>> p = hmmsim.System(ram=256 << 20, hugetlb_pages=8).spawn()
>>> a = p.mmap(8 * 4096)
>>> p.write(a, b"mirror me")
>>> r = p.open_device(0).read(a, 8)          # the device reads through hmm_range_fault()
>>> bytes(r.data[:9]), r.cpages, r.faults
(b'mirror me', 8, 1)
>>> p.system.stats["hmm.range_fault"] > 0
True
"""

from . import drivers  # noqa: E402,F401,I001  (registers the drivers' modules: test_hmm, ...)
from .device import Device, DeviceAccess
from .errors import (
    BadAddress,
    BusError,
    Busy,
    HmmError,
    HmmsimError,
    InvalidArgument,
    KernelOops,
    Killed,
    NoDevice,
    NoEntry,
    NoSuchProcess,
    NotSupportedError,
    OutOfMemory,
    PermissionDenied,
    SegmentationFault,
)
from .process import Process
from .system import System, SystemConfig

__all__ = (
    "BadAddress", "BusError", "Busy", "Device", "DeviceAccess", "HmmError", "HmmsimError",
    "InvalidArgument", "KernelOops", "Killed", "NoDevice", "NoEntry", "NoSuchProcess",
    "NotSupportedError", "OutOfMemory", "PermissionDenied", "Process", "SegmentationFault",
    "System", "SystemConfig",
)
__version__ = "0.1.0"

"""hmmsim: an executable model of Linux HMM (Heterogeneous Memory Management).

The kernel-level API mirrors the kernel by name (``hmmsim.hmm.hmm.hmm_range_fault``,
``hmmsim.kernel.mmu_notifier.mmu_interval_read_begin``, ...); the friendly layer is
:class:`System`, :class:`Process`, :class:`Device` and the exceptions of
:mod:`hmmsim.errors`.
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

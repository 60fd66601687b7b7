"""Kernel errno values (``include/uapi/asm-generic/errno-base.h`` and ``errno.h``).

Defined here rather than taken from :mod:`errno` so that the model returns the Linux
values on every host.
"""

__all__ = (
    "EACCES", "EAGAIN", "EBADF", "EBUSY", "EEXIST", "EFAULT", "EHWPOISON", "EINTR", "EINVAL",
    "EIO", "ENODEV", "ENOENT", "ENOLCK", "ENOMEM", "ENOSPC", "ENOTTY", "ENXIO", "EOPNOTSUPP",
    "EOVERFLOW", "EPERM", "ERANGE", "ESRCH", "errno_name",
)

EPERM = 1
ENOENT = 2
ESRCH = 3
EINTR = 4
EIO = 5
ENXIO = 6
EBADF = 9
EAGAIN = 11
ENOMEM = 12
EACCES = 13
EFAULT = 14
EBUSY = 16
EEXIST = 17
ENODEV = 19
EINVAL = 22
ENOTTY = 25
ENOSPC = 28
ERANGE = 34
ENOLCK = 37
EOVERFLOW = 75
EOPNOTSUPP = 95
EHWPOISON = 133

_NAMES = {v: k for k, v in globals().items() if k.startswith("E") and isinstance(v, int)}


def errno_name(err: int) -> str:
    """Name a (positive or negative) errno value, e.g. ``-14`` -> ``"-EFAULT"``."""
    name = _NAMES.get(abs(err))
    if name is None:
        return str(err)
    return f"-{name}" if err < 0 else name

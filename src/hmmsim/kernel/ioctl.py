"""ioctl command numbers (``include/uapi/asm-generic/ioctl.h``): direction << 30 | size << 16
| type << 8 | nr, with direction 0 (none), 1 (write), 2 (read) or 3 (both)."""

from __future__ import annotations

__all__ = ("_IO", "_IOC", "_IOR", "_IOW", "_IOWR")

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, type_: str | int, nr: int, size: int) -> int:
    """``_IOC()``; *type_* is the ioctl's type character (or its code)."""
    t = ord(type_) if isinstance(type_, str) else type_
    return (direction << 30) | (size << 16) | (t << 8) | nr


def _IO(type_: str | int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: str | int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ, type_, nr, size)


def _IOW(type_: str | int, nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, type_, nr, size)


def _IOWR(type_: str | int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, size)

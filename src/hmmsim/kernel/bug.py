"""Where the simulated kernel stops: ``BUG()``/oops (``include/asm-generic/bug.h``,
``lib/bug.c``) and paths the model does not cover.

These are findings about the modelled kernel, not errors of the caller, and they belong
to the kernel layer: kernel code raises them without knowing about the user-facing
:mod:`hmmsim.errors` (which re-exports both). The scenario runner reports them as
``kernel-oops`` and ``unsupported`` records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .system import System

__all__ = ("KernelOops", "NotSupportedError", "WARN")


class KernelOops(Exception):
    """The real kernel would oops (crash) here; the model stops instead of guessing."""


class NotSupportedError(Exception):
    """The model does not implement this path yet (the message says which)."""


def WARN(sys: "System", message: str, counter: str) -> None:
    """``WARN(1, message)``: the kernel prints a warning with a backtrace and goes on. The
    model counts it under *counter* in ``sys.stats`` and keeps the message with the
    machine's other survived warnings (``sys.ls.warnings``, printed by ``hmmsim run`` on
    stderr), once per distinct message."""
    sys.stats.add(counter)
    if message not in sys.ls.warnings:
        sys.ls.warnings.append(message)

"""Where the simulated kernel stops: ``BUG()``/oops (``include/asm-generic/bug.h``,
``lib/bug.c``) and paths the model does not cover.

These are findings about the modelled kernel, not errors of the caller, and they belong
to the kernel layer: kernel code raises them without knowing about the user-facing
:mod:`hmmsim.errors` (which re-exports both). The scenario runner reports them as
``kernel-oops`` and ``unsupported`` records.
"""

from __future__ import annotations

__all__ = ("KernelOops", "NotSupportedError")


class KernelOops(Exception):
    """The real kernel would oops (crash) here; the model stops instead of guessing."""


class NotSupportedError(Exception):
    """The model does not implement this path yet (the message says which)."""

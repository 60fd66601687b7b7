"""``kernel/bug.py``: the kernel layer's own stops (oops, unsupported path), re-exported
by the facade, and the kernel layer not depending on the user-facing errors module."""

from __future__ import annotations

from pathlib import Path

import hmmsim
from hmmsim import errors
from hmmsim.kernel import bug


def test_kernel_oops_and_not_supported_live_in_the_kernel_layer() -> None:
    assert errors.KernelOops is bug.KernelOops is hmmsim.KernelOops
    assert errors.NotSupportedError is bug.NotSupportedError is hmmsim.NotSupportedError
    assert bug.KernelOops.__module__ == "hmmsim.kernel.bug"
    kernel_dir = Path(bug.__file__).parent
    offenders = [p.name for p in sorted(kernel_dir.glob("*.py"))
                 if "from ..errors import" in p.read_text() or "import hmmsim.errors" in p.read_text()]
    assert offenders == [], "kernel modules must not import the facade's errors"

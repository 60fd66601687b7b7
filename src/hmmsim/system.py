"""The friendly machine: :class:`hmmsim.kernel.system.System` plus :meth:`System.spawn`,
which hands out processes wrapped in the :class:`~hmmsim.process.Process` API.

>>> from hmmsim import System
>>> p = System(ram=256 << 20).spawn("demo")
>>> p.task.name
'demo'
"""

from __future__ import annotations

from .kernel import system as _kernel
from .process import Process

__all__ = ("System", "SystemConfig")

SystemConfig = _kernel.SystemConfig


class System(_kernel.System):
    """One simulated machine with the friendly process API on top."""

    def spawn(self, name: str = "") -> Process:
        """A new process (an empty address space, as ``exec`` leaves it), wrapped in
        :class:`~hmmsim.process.Process`."""
        return Process(self, self.create_task(name))

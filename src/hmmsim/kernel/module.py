"""Loadable modules: ``module_init()`` registration and loading into a machine
(``include/linux/module.h``). Drivers register their init function under their module
name when imported (the ``hmmsim`` package imports :mod:`hmmsim.drivers`, so every
driver is registered before any machine boots); a :class:`~hmmsim.kernel.system.System`
loads the ones its config asks for, so the core never imports a driver."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .system import System

__all__ = ("load_module", "module_init")

_MODULES: dict[str, Callable[["System"], None]] = {}


def module_init(name: str) -> Callable[[Callable[["System"], None]], Callable[["System"], None]]:
    """Register *fn* as the init function of module *name* (``module_init(fn)``)."""
    def deco(fn: Callable[["System"], None]) -> Callable[["System"], None]:
        _MODULES[name] = fn
        return fn
    return deco


def load_module(sys: "System", name: str) -> None:
    """``modprobe name`` on *sys*."""
    try:
        init = _MODULES[name]
    except KeyError:
        raise ValueError(f"no module {name!r}; known: {', '.join(sorted(_MODULES))}") from None
    init(sys)
    sys.modules_loaded.append(name)

"""Where hmmsim keeps the kernel images it builds and boots (``hmmsim oracle build`` writes
them, ``hmmsim oracle run`` and ``compare/fuzz/minimize --kernel K`` find them).

The cache root is ``$HMMSIM_CACHE`` if set, else ``$XDG_CACHE_HOME/hmmsim``, else
``~/.cache/hmmsim``. A kernel image for release *K* (``6.12``, ``7.3``, or any version
string the build names it by) is the directory ``ROOT/kernels/K/``; ``--image DIR`` names
any directory with the same layout:

=================  =============================================================================
``bzImage``        the kernel (required)
``test_hmm.ko``    optional: test_hmm as a module, loaded afresh (with the device parameters)
                   for every scenario file; without it test_hmm is built in and the device
                   parameters go on the kernel command line
``hmm-tests``      optional: ``tools/testing/selftests/mm/hmm-tests`` of that kernel, static
``hmmsim-runner``  optional: a static scenario runner, used only where no C compiler is at
                   hand (``oracle run`` compiles the package's ``runner/*.c`` into ``ROOT/runner/``)
``config``         optional: the kernel's ``.config``
``build.json``     optional: how it was built (``{"version": ..., "source": ..., ...}``)
=================  =============================================================================

This module models no kernel code."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = (
    "IMAGE_FILES",
    "KernelImage",
    "cache_root",
    "find_image",
    "image_dir",
    "list_images",
)

#: the files of an image directory (only ``bzImage`` is required)
IMAGE_FILES = ("bzImage", "test_hmm.ko", "hmm-tests", "hmmsim-runner", "config", "build.json")


def cache_root(env: dict[str, str] | None = None) -> Path:
    """The cache root: ``$HMMSIM_CACHE``, else ``$XDG_CACHE_HOME/hmmsim``, else
    ``~/.cache/hmmsim`` (empty variables count as unset).

    >>> str(cache_root({"HMMSIM_CACHE": "/c", "XDG_CACHE_HOME": "/x"}))
    '/c'
    >>> str(cache_root({"XDG_CACHE_HOME": "/x", "HOME": "/h"}))
    '/x/hmmsim'
    >>> str(cache_root({"HOME": "/h"}))
    '/h/.cache/hmmsim'
    """
    env = os.environ if env is None else env
    if env.get("HMMSIM_CACHE"):
        return Path(env["HMMSIM_CACHE"])
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]) / "hmmsim"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".cache" / "hmmsim"


def image_dir(kernel: str, env: dict[str, str] | None = None) -> Path:
    """The directory where the image of release *kernel* lives (or would be written).

    >>> str(image_dir("7.3", {"HMMSIM_CACHE": "/c"}))
    '/c/kernels/7.3'
    """
    if not kernel or "/" in kernel or kernel in (".", ".."):
        raise ValueError(f"bad kernel name {kernel!r}")
    return cache_root(env) / "kernels" / kernel


@dataclass(frozen=True)
class KernelImage:
    """An image directory (see the module docstring); optional files are None when absent."""

    path: Path
    bzimage: Path
    test_hmm_ko: Path | None
    hmm_tests: Path | None
    runner: Path | None
    config: Path | None
    build_json: Path | None

    @classmethod
    def at(cls, path: str | Path) -> "KernelImage":
        """The image in directory *path*; ``FileNotFoundError`` without a ``bzImage``."""
        p = Path(path)
        if not (p / "bzImage").is_file():
            raise FileNotFoundError(f"{p}: no bzImage (not a kernel image directory)")

        def opt(name: str) -> Path | None:
            f = p / name
            return f if f.is_file() else None

        return cls(p, p / "bzImage", opt("test_hmm.ko"), opt("hmm-tests"), opt("hmmsim-runner"),
                   opt("config"), opt("build.json"))


def find_image(kernel: str, env: dict[str, str] | None = None) -> KernelImage | None:
    """The cached image of release *kernel*, or None when there is none."""
    try:
        return KernelImage.at(image_dir(kernel, env))
    except (FileNotFoundError, ValueError):
        return None


def list_images(env: dict[str, str] | None = None) -> list[str]:
    """The releases with an image in the cache, sorted."""
    root = cache_root(env) / "kernels"
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if (d / "bzImage").is_file())

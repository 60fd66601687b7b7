"""Differential testing against real kernels: run scenarios on hmmsim and on a kernel,
compare (:mod:`.compare`), fuzz (:mod:`.fuzz`) and minimise (:mod:`.minimize`) what
differs. See :mod:`.cli` for the ``hmmsim compare|fuzz|minimize`` commands."""

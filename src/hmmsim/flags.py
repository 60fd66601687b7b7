"""Flag decoding in one place, in drgn's format (``drgn/helpers/common/format.py``).

Used for pte bits, ``HMM_PFN_*``, ``MIGRATE_PFN_*``, ``vm_flags`` and page flags.
"""

from collections.abc import Iterable

__all__ = ("decode_flags",)


def decode_flags(value: int, flags: Iterable[tuple[str, int]], bit_numbers: bool = True) -> str:
    """Return the names of the flags set in *value*, joined with ``|``.

    :param value: the flag word.
    :param flags: ``(name, bit)`` pairs; ``bit`` is a bit number if *bit_numbers*, else a mask.
    :return: e.g. ``"VALID|WRITE|0x18"``; unknown bits are appended as a hex remainder and a
        zero value gives ``"0"``.

    >>> decode_flags(0x1b, [("BOLD", 0), ("ITALIC", 1)])
    'BOLD|ITALIC|0x18'
    >>> decode_flags(0, [("BOLD", 0)])
    '0'
    """
    if value == 0:
        return "0"
    parts = []
    rest = value
    for name, bit in flags:
        mask = 1 << bit if bit_numbers else bit
        if mask and (rest & mask) == mask:
            parts.append(name)
            rest &= ~mask
    if rest:
        parts.append(hex(rest))
    return "|".join(parts)

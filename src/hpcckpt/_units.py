"""Parsing of sizes such as "1GiB" or "512M"."""
from __future__ import annotations

import re

_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string with an optional unit.

    >>> parse_size("1GiB"), parse_size("64M"), parse_size(4096)
    (1073741824, 64000000, 4096)
    """
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ValueError(f"cannot read size {size!r}: use e.g. 4096, '512MiB' or '1GiB'")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if n <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return n

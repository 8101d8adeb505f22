"""Sizes on the command line (`--gpu-mem`, `--reserve`, `--max-shard-size`): one parser for all of them.

    SIZE = NUMBER UNIT        NUMBER: 24, 1.5 (a space before the unit is fine); UNIT, case-insensitive:
        KB MB GB TB           decimal: 10^3, 10^6, 10^9, 10^12 bytes (as transformers' max_shard_size)
        KiB MiB GiB TiB       binary:  2^10, 2^20, 2^30, 2^40 bytes
        K M G T               binary, as nvidia-smi and `docker --memory` mean them: 24G = 24GiB
        B                     bytes

A number without a unit is refused (is `--gpu-mem 24` 24 bytes or 24 GiB?), and so is a size below 1 MiB (no GPU
and no useful shard is that small: a unit was forgotten) or above 1 EiB; `0` alone is accepted only where zero
means something (`--reserve 0`). The value is exact (fractions are kept until the bytes are counted, then floored).
"""

from __future__ import annotations

import re
from fractions import Fraction

from tpcli.errors import UsageError

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
         "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
MIN_BYTES = 2**20
MAX_BYTES = 2**60
HELP = "G/GiB = 2^30 bytes, GB = 10^9; likewise K, M, T"
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str | None, flag: str, *, zero: bool = False) -> int:
    """'24GiB', '24G', '80GB', '1.5 TiB', '512MiB' -> bytes; a usage error naming `flag` for anything else (see the
    module docstring). `zero`: a plain 0 means 0 bytes."""
    text = text if isinstance(text, str) else ""
    if zero and text.strip() in ("0", "0B", "0b"):
        return 0
    m = _SIZE.fullmatch(text)
    whole, _, fraction = m.group(1).partition(".") if m else ("", "", "")
    if m is None or (m.group(2) and m.group(2).lower() not in UNITS) or len(fraction) > 30:
        raise UsageError(f"{flag} {_show(text)}: expected a size such as 24GiB, 80GB or 512MiB ({HELP}).")
    if len(whole.lstrip("0")) > 25:  # more than 10^25 of any unit: past 1 EiB anyway
        raise UsageError(f"{flag} {_show(text)}: larger than 1 EiB; expected a size such as 24GiB or 80GB.")
    if Fraction(m.group(1)) == 0:
        raise UsageError(f"{flag} {_show(text)}: must be at least 1 MiB, e.g. 24GiB ({HELP}).")
    if not m.group(2):
        raise UsageError(f"{flag} {_show(text)}: a size needs a unit; did you mean {m.group(1)}GiB? ({HELP}).")
    n = int(Fraction(m.group(1)) * UNITS[m.group(2).lower()])
    if n < MIN_BYTES:
        raise UsageError(f"{flag} {_show(text)}: {n} bytes is below 1 MiB; give a unit, e.g. 24GiB ({HELP}).")
    if n > MAX_BYTES:
        raise UsageError(f"{flag} {_show(text)}: larger than 1 EiB; expected a size such as 24GiB or 80GB.")
    return n


def _show(text: str) -> str:
    """The value as typed, quoted, cut to 40 characters (a 400-digit number must not flood the error line)."""
    return repr(text if len(text) <= 40 else text[:37] + "...")

"""Units: dtypes and their sizes, byte counts and how they print, and the size, duration and dtype flags.

Every layer that counts bytes asks here, so a dtype tpcli does not know is an error in one place (`dtype_size`
raises), never a silent 4 bytes per element; every flag that takes a size, a duration or a dtype is parsed here.

    tensor_bytes("bfloat16", (4096, 4096)) == 2 * 4096 * 4096
    SAFETENSORS_CODES["bfloat16"] == "BF16"      # the dtype string in a safetensors header
    parse_size("24GiB", "--gpu-mem") == 24 * 2**30;  parse_duration("30m", "--timeout") == 1800.0
    parse_dtype("bf16", "--dtype", allowed=CAST_DTYPES) == "bfloat16"

Sizes on the command line (`--gpu-mem`, `--reserve`, `--max-shard-size`):

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

import math
import re
from fractions import Fraction

from tpcli.errors import CheckpointError, UsageError

# torch dtype name (without "torch.") -> bytes per element. float4_e2m1fn_x2 packs two 4-bit values per element.
DTYPE_SIZES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
}
# torch dtype name <-> safetensors header code, for the dtypes tpcli writes
SAFETENSORS_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
SAFETENSORS_DTYPES = {v: k for k, v in SAFETENSORS_CODES.items()}
# bits per element of every safetensors dtype (the library's `Dtype` enum)
SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4,
    "F6_E2M3": 6, "F6_E3M2": 6,
}


def dtype_size(name: str) -> int:
    """Bytes per element of torch dtype `name` ("bfloat16", "torch.bfloat16"); an unknown name raises."""
    try:
        return DTYPE_SIZES[name.removeprefix("torch.")]
    except KeyError:
        raise CheckpointError(f"dtype {name!r}: tpcli does not know its size (known: {', '.join(DTYPE_SIZES)}).") from None


def tensor_bytes(dtype: str, shape) -> int:
    """Bytes of a dense tensor of `shape` in dtype `dtype` (a torch dtype name)."""
    return dtype_size(dtype) * math.prod(shape)


def human_bytes(n: float) -> str:
    """Binary units, as memory is budgeted: 1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def decimal_bytes(n: float) -> str:
    """Decimal units, as disks are sold and `df` prints: 1_500_000_000 -> '1.5 GB'."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


# --- flags -----------------------------------------------------------------------------------------------

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
        raise UsageError(f"{flag} {_show(text)}: {n:,} bytes is below the smallest size, 1 MiB = 1,048,576 bytes "
                         f"({HELP}).")
    if n > MAX_BYTES:
        raise UsageError(f"{flag} {_show(text)}: larger than 1 EiB; expected a size such as 24GiB or 80GB.")
    return n


def _show(text: str) -> str:
    """The value as typed, quoted, cut to 40 characters (a 400-digit number must not flood the error line)."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


_DURATIONS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | None, flag: str) -> float | None:
    """'90s', '30m', '2h', '1d' or plain seconds -> seconds; None stays None (no limit)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d{1,12}(?:\.\d{1,9})?)\s*([smhd]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"{flag} {_show(text)}: expected a positive duration such as 90s, 30m, 2h or plain seconds.")
    return float(m.group(1)) * _DURATIONS[m.group(2)]


# what a dtype flag accepts -> torch dtype name
DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
                 "fp32": "float32", "float32": "float32", "float": "float32", "fp8": "float8_e4m3fn",
                 "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2", "int8": "int8"}
CAST_DTYPES = ("bfloat16", "float16", "float32")  # what shard/gather --dtype casts floating-point weights to
_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float8_e4m3fn": "fp8", "float8_e5m2": "float8_e5m2",
          "int8": "int8"}


def parse_dtype(text: str | None, flag: str, *, allowed=None) -> str | None:
    """'bf16', 'fp16', 'fp32', 'fp8', ... -> the torch dtype name, restricted to `allowed` when given; None stays
    None. Anything else is a usage error listing what `flag` takes."""
    if text is None:
        return None
    name = DTYPE_ALIASES.get(text.strip().lower())
    choices = allowed or tuple(dict.fromkeys(DTYPE_ALIASES.values()))
    if name is None or name not in choices:
        shown = _show(text) if not text.strip() or len(text) > 40 else text.strip()
        raise UsageError(f"{flag} {shown}: expected one of {', '.join(_SHORT[c] for c in choices)}.")
    return name

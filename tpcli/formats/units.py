"""Units: dtypes and their sizes, byte counts, and how a byte count is printed.

Every layer that counts bytes asks here, so a dtype tpcli does not know is an error in one place (`dtype_size`
raises), never a silent 4 bytes per element.

    tensor_bytes("bfloat16", (4096, 4096)) == 2 * 4096 * 4096
    SAFETENSORS_CODES["bfloat16"] == "BF16"      # the dtype string in a safetensors header
"""

from __future__ import annotations

import math

from tpcli.errors import CheckpointError

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

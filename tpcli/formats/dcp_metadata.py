"""torch DCP's `.metadata` file (a pickle), read without running code: the one place tpcli unpickles it.

The file is `pickle.dump(Metadata(...))` by `torch.distributed.checkpoint.FileSystemWriter`. The unpickler below
builds only the exact (module, name) pairs in `ALLOWED` (dataclasses of DCP's metadata, `torch.Size`, dtypes,
layouts, paths); any other global, dotted names included (`filesystem.os.system`), refuses the file before
anything is built. The file's size is bounded before it is read.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

from tpcli.errors import CheckpointError

MAX_BYTES = 1 << 30  # 1 GiB: a 1T-parameter checkpoint's metadata on 1024 ranks is a few hundred MB
_META = "torch.distributed.checkpoint.metadata"
_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "complex64", "complex128", "int64", "int32", "int16",
                "int8", "uint8", "uint16", "uint32", "uint64", "bool", "float8_e4m3fn", "float8_e5m2",
                "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2")
ALLOWED: frozenset[tuple[str, str]] = frozenset({
    *((_META, n) for n in ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
                           "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), *(("torch", n) for n in _DTYPE_NAMES),
    ("torch.serialization", "_get_layout"),  # a lookup in torch's table of layouts
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
})


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")
        return super().find_class(module, name)


def read_dcp_metadata(path: Path, *, max_bytes: int = MAX_BYTES):
    """The `torch.distributed.checkpoint.metadata.Metadata` in `path`; a one-line CheckpointError for a file that is
    missing, too large, not a pickle of DCP metadata, or names any global outside `ALLOWED`."""
    from torch.distributed.checkpoint.metadata import Metadata

    from tpcli.formats.tensor_file import require_regular_file

    path = Path(path)
    require_regular_file(path, "DCP metadata")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise CheckpointError(f"{path}: {size:,} bytes, more than DCP metadata can hold ({max_bytes:,}); "
                                      "refusing to read it.")
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror}).") from None
    try:
        meta = _Unpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, ImportError, KeyError,
            IndexError, RecursionError, MemoryError) as exc:
        raise CheckpointError(f"{path}: not DCP metadata ({str(exc)[:200]}); refusing to read it.") from None
    if not isinstance(meta, Metadata):
        raise CheckpointError(f"{path}: not DCP metadata (a {type(meta).__name__}).")
    return meta

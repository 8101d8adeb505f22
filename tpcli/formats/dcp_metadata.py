"""torch DCP's `optimizer/.metadata` in a training-state folder, read without running code and checked against the
folder before torch reads anything it points at.

`.metadata` is a pickle of `torch.distributed.checkpoint.metadata.Metadata`:

    state_dict_metadata  {fqn: TensorStorageMetadata(properties, size, chunks=[ChunkStorageMetadata(offsets, sizes)])
                          | BytesStorageMetadata()}
    storage_data         {MetadataIndex(fqn, offset): _StorageInfo(relative_path, offset, length)}: where each chunk
                         (or non-tensor value) lies: `length` bytes at `offset` of optimizer/`relative_path`
    storage_meta, planner_data, version

Reading (`read_metadata`): an unpickler that resolves exactly the (module, name) pairs in `ALLOWED` (DCP's metadata
classes, torch.Size, the dtypes, the layout lookup, PosixPath: the set torch's own save of AdamW state pickles) and
nothing else: a dotted name (`os.system` looked up through a module, which protocol 4 would resolve) or any other
global is a CheckpointError naming the file, raised before the object is built. The file is size-capped before it
is read (`metadata_limit`), and the work of unpickling stays proportional to it (dict keys a str or a small
MetadataIndex, call arguments small, no sets: hashing memoised nested tuples or colliding ints is refused); a pickle that sets attributes on what it may reach (BUILD on an allowed class, function
or enum member: process-wide state) is undone and refused. Every field then has its expected type
(`check_structure`).

Checking (`check_storage`): every `relative_path` is a plain file name listed in the manifest under optimizer/
(a regular file, not a link or FIFO); every [offset, offset + length) lies inside that file and no two overlap (so
there are at most as many entries as bytes); every chunk and value has its entry; no storage transforms; every
non-tensor value a small torch.save archive of stored (uncompressed) members (`check_value`).
"""

from __future__ import annotations

import importlib
import pickle
import stat
from pathlib import Path

from tpcli.errors import CheckpointError
from tpcli.formats import state_manifest as sm

MAX_DIMS = 64  # dims of a tensor (torch's own limit is lower in practice)
MAX_METADATA_BYTES = 256 << 20  # a tiny model's AdamW index is ~80 KB; larger only beside larger optimizer files
_META = "torch.distributed.checkpoint.metadata"
_TORCH_DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                 "float8_e5m2fnuz", "float8_e8m0fnu", "complex64", "complex128", "int64", "int32", "int16", "int8",
                 "uint8", "uint16", "uint32", "uint64", "bool")
ALLOWED = frozenset({
    (_META, "Metadata"), (_META, "MetadataIndex"), (_META, "StorageMeta"), (_META, "TensorStorageMetadata"),
    (_META, "BytesStorageMetadata"), (_META, "ChunkStorageMetadata"), (_META, "TensorProperties"),
    (_META, "_MEM_FORMAT_ENCODING"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("pathlib._local", "PosixPath"),  # Python 3.13's module for it
    *(("torch", name) for name in _TORCH_DTYPES),
})


MAX_HASH_WEIGHT = 256  # elements a dict key may hash (a MetadataIndex: its fqn and a chunk offset of <= 64 dims)
MAX_ARGS_WEIGHT = 4096  # elements of the arguments of one call (a torch.Size's dims, a layout or enum name)


def _weight(obj, budget: int) -> int:
    """How many elements hashing or reading `obj` visits (containers walked, shared children counted each time
    they are reached, as `hash` does; an int weighs one per 64 bits), counted up to `budget` + 1 and no further,
    so the walk itself is bounded."""
    total, todo = 0, [obj]
    while todo and total <= budget:
        o = todo.pop()
        total += 1
        t = type(o)
        if t is int:
            total += o.bit_length() >> 6
        elif isinstance(o, (tuple, list, frozenset, set)):
            todo.extend(o)
        elif isinstance(o, dict):
            todo.extend(o.keys())
            todo.extend(o.values())
        elif t.__module__.startswith("torch.distributed.checkpoint") and hasattr(o, "__dict__"):
            todo.extend(vars(o).values())  # a MetadataIndex hashes its fields
    return total


class _AllowListUnpickler(pickle._Unpickler):  # noqa: SLF001 - the Python unpickler: its opcodes can be guarded
    """Resolves only the exact (module, name) pairs of ALLOWED, by one getattr on the imported module.

    The work of unpickling stays proportional to the file: a hash visits every element of a tuple every time
    (tuples do not cache it), so a few hundred bytes of memoised tuples nested 12 deep (16 wide) made one dict
    key cost 16^12 steps, and int keys collide at will (their hash is not randomised). So every dict key is a str
    or a MetadataIndex with a str fqn, of at most MAX_HASH_WEIGHT elements; every call's arguments (REDUCE,
    NEWOBJ: an enum or layout lookup hashes them) at most MAX_ARGS_WEIGHT; sets and the protocol-0/1 object
    opcodes, which DCP never writes, are refused.
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001

    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of DCP metadata")
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent id, which DCP metadata never does")

    def _keys(self, keys) -> None:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        for k in keys:
            if type(k) is not str and not (type(k) is MetadataIndex and type(vars(k).get("fqn")) is str
                                           and _weight(k, MAX_HASH_WEIGHT) <= MAX_HASH_WEIGHT):
                raise pickle.UnpicklingError(f"a dict key is a {type(k).__name__} that is not a name or a chunk "
                                             "index DCP writes")

    def _args(self, *args) -> None:
        if _weight(args, MAX_ARGS_WEIGHT) > MAX_ARGS_WEIGHT:
            raise pickle.UnpicklingError(f"a call has arguments of more than {MAX_ARGS_WEIGHT} elements")

    def load_setitem(self):
        self._keys(self.stack[-2:-1])
        super().load_setitem()

    def load_setitems(self):
        self._keys(self.stack[0::2])
        super().load_setitems()

    def load_dict(self):
        self._keys(self.stack[0::2])
        super().load_dict()

    def load_reduce(self):
        self._args(self.stack[-1])
        super().load_reduce()

    def load_newobj(self):
        self._args(self.stack[-1])
        super().load_newobj()

    def load_newobj_ex(self):
        self._args(self.stack[-2], self.stack[-1])
        super().load_newobj_ex()

    def _refuse(self):
        raise pickle.UnpicklingError("it builds a set or an old-protocol object, which DCP metadata never holds")

    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    for _op in (pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET, pickle.INST, pickle.OBJ):
        dispatch[_op[0]] = _refuse
    del _op


def metadata_limit(doc: dict) -> int:
    """The most bytes `.metadata` may have beside the optimizer files the manifest `doc` lists: MAX_METADATA_BYTES,
    or as many as those files hold (every entry names a distinct byte range of them, each far larger than the
    entry itself), whichever is larger."""
    data = sum(e["bytes"] for n, e in doc["files"].items() if n.startswith(f"{sm.OPTIMIZER_DIR}/") and
               not n.endswith("/.metadata"))
    return max(MAX_METADATA_BYTES, data)


def read_metadata(folder: Path, *, limit: int = MAX_METADATA_BYTES):
    """The DCP `Metadata` of `folder/.metadata` (at most `limit` bytes: `metadata_limit`), built from ALLOWED
    classes only and type-checked; a CheckpointError naming the file otherwise."""
    path = Path(folder) / ".metadata"
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the optimizer state is incomplete.") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file (a link, FIFO or folder); refusing to read it.")
    if st.st_size > limit:
        raise CheckpointError(f"{path}: {st.st_size:,} bytes, more than DCP metadata needs beside these optimizer "
                              f"files ({limit:,}); refusing to read it.")
    shared = _shared_objects()
    before = [dict(vars(o)) for o in shared]
    try:
        with open(path, "rb") as f:
            meta = _AllowListUnpickler(f).load()
    except Exception as exc:  # noqa: BLE001 - whatever a hostile pickle raises, it is not DCP metadata
        meta, error = None, f"{type(exc).__name__}: {exc}"
    else:
        error = None
    changed = _restore(shared, before)
    if changed:
        error = f"it sets {changed} of a class or constant this process shares (BUILD on a global)"
    if error is not None:
        raise CheckpointError(f"{path}: not DCP metadata ({error}); refusing to read it.")
    check_structure(path, meta)
    return meta


def _shared_objects() -> list:
    """The objects of this process a pickle restricted to ALLOWED can reach and that have attributes to set:
    the allowed classes and function (pickle's BUILD with slot state calls setattr on whatever is on its stack)
    and the members of the allowed enum (singletons; BUILD with a dict state writes into their __dict__)."""
    import enum

    reachable = []
    for module, name in sorted(ALLOWED):
        try:
            reachable.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another Python's module name, a dtype this torch lacks
            continue
    members = [m for o in reachable if isinstance(o, type) and issubclass(o, enum.Enum) for m in o]
    return [o for o in [*reachable, *members] if hasattr(o, "__dict__")]


def _restore(shared: list, before: list[dict]) -> str:
    """Put back any attribute the load set, added or removed on `shared`; the first one's name, or ''."""
    changed = ""
    for obj, old in zip(shared, before, strict=True):
        now = dict(vars(obj))
        for key in [k for k in now if k not in old or now[k] is not old[k]] + [k for k in old if k not in now]:
            changed = changed or f"{getattr(obj, '__qualname__', type(obj).__qualname__)}.{key}"
            if isinstance(obj, type) or callable(obj):  # a class's __dict__ is read-only: through setattr
                if key in old:
                    setattr(obj, key, old[key])
                else:
                    delattr(obj, key)
            elif key in old:  # an enum member: its __dict__ itself
                obj.__dict__[key] = old[key]
            else:
                del obj.__dict__[key]
    return changed


def _is_int(v) -> bool:
    return type(v) is int and v >= 0


def _is_size(v, size_type) -> bool:
    return type(v) is size_type and all(type(x) is int and x >= 0 for x in v)


def check_structure(path: Path, meta) -> None:
    """Every field of `meta` has the type torch's writer gives it (so later checks and torch see only plain
    values): a CheckpointError naming `path` and the entry otherwise."""
    import torch
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    from tpcli.adapters.torch_api import StorageInfo

    def bad(what: str):
        raise CheckpointError(f"{path}: {what}; the DCP metadata is corrupt or crafted, refusing to read it.")

    if type(meta) is not Metadata:
        bad(f"holds a {type(meta).__name__}, not a Metadata")
    if type(meta.state_dict_metadata) is not dict or type(meta.storage_data) is not dict:
        bad("state_dict_metadata or storage_data is not a dict")
    size = torch.Size
    for fqn, m in meta.state_dict_metadata.items():
        if type(fqn) is not str:
            bad(f"a state_dict_metadata key is a {type(fqn).__name__}")
        if type(m) is BytesStorageMetadata:
            continue
        if type(m) is not TensorStorageMetadata or type(m.properties) is not TensorProperties \
                or type(m.properties.dtype) is not torch.dtype or not _is_size(m.size, size) \
                or type(m.chunks) is not list or len(m.size) > MAX_DIMS:
            bad(f"entry {fqn} is not a tensor's or a value's metadata")
        starts: set = set()
        for c in m.chunks:
            if type(c) is not ChunkStorageMetadata or not _is_size(c.offsets, size) or not _is_size(c.sizes, size) \
                    or len(c.offsets) != len(m.size) or len(c.sizes) != len(m.size):
                bad(f"entry {fqn} has a malformed chunk")
            start = tuple(c.offsets)
            if start in starts:  # a pickle repeats a chunk in 2 bytes (a memo GET): refused at the first copy,
                bad(f"entry {fqn} lists a chunk twice")  # before this loop or the later checks visit the others
            starts.add(start)
    for key, info in meta.storage_data.items():
        if type(key) is not MetadataIndex or type(key.fqn) is not str \
                or not (key.offset is None or _is_size(key.offset, size)):
            bad("a storage_data key is not a MetadataIndex")
        if type(info) is not StorageInfo or type(info.relative_path) is not str or not _is_int(info.offset) \
                or not _is_int(info.length):
            bad(f"the storage of {key.fqn} is not a (relative_path, offset, length)")
        if getattr(info, "transform_descriptors", None):
            bad(f"the storage of {key.fqn} asks for transforms {info.transform_descriptors!r} (tpcli reads plain "
                "DCP files only)")
    if meta.planner_data is not None and type(meta.planner_data) is not dict:
        bad("planner_data is not a dict")


def check_storage(folder: Path, doc: dict, meta) -> None:
    """Every place `meta` points at is a byte range inside a file of `folder` (a training-state folder's
    optimizer/) that the manifest `doc` lists; no ranges overlap; every chunk and value has one."""
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    path = Path(folder) / ".metadata"
    sizes: dict[str, int] = {}
    ranges: dict[str, list[tuple[int, int, str]]] = {}
    for key, info in meta.storage_data.items():
        name = info.relative_path
        listed = f"{sm.OPTIMIZER_DIR}/{name}"
        if not name or "/" in name or "\\" in name or "\0" in name or name in (".", "..") or listed not in doc["files"]:
            raise CheckpointError(f"{path}: {key.fqn} is stored in {name!r}, not a file of {Path(folder)} listed in "
                                  f"{sm.NAME}; refusing to read outside the listed files.")
        if name not in sizes:
            try:
                st = (Path(folder) / name).lstat()
            except OSError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{Path(folder) / name}: not a regular file (missing, a link or a FIFO); the "
                                      "optimizer state cannot be read from it.")
            sizes[name] = min(st.st_size, doc["files"][listed]["bytes"])
        if info.length < 1 or info.offset + info.length > sizes[name]:
            end = info.offset + info.length
            raise CheckpointError(f"{Path(folder) / name}: {key.fqn} is stored at bytes {info.offset}..{end} of a "
                                  f"{sizes[name]}-byte file; the file is truncated or the metadata corrupt.")
        ranges.setdefault(name, []).append((info.offset, info.offset + info.length, key.fqn))
    for name, spans in ranges.items():
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise CheckpointError(f"{Path(folder) / name}: the bytes of {b} overlap those of {a}; the DCP metadata "
                                      "is corrupt or crafted.")
    for fqn, m in meta.state_dict_metadata.items():
        keys = [MetadataIndex(fqn, c.offsets) for c in m.chunks] if isinstance(m, TensorStorageMetadata) else [
            MetadataIndex(fqn)]
        for k in keys:
            if k not in meta.storage_data:
                chunk = "" if k.offset is None else f" for its chunk at {list(k.offset)}"
                raise CheckpointError(f"{path}: {fqn} has no stored bytes{chunk}; the optimizer state is incomplete.")
    for fqn, m in meta.state_dict_metadata.items():
        if not isinstance(m, TensorStorageMetadata):
            check_value(Path(folder), fqn, meta.storage_data[MetadataIndex(fqn)])


MAX_VALUE_BYTES = 1 << 20  # a non-tensor value (lr, betas, ...): torch.save of a float or a tuple, ~1.3 KB


def check_value(folder: Path, fqn: str, info) -> None:
    """The bytes of a non-tensor value, which load_state hands torch.load(weights_only=True), are what torch.save
    writes: at most MAX_VALUE_BYTES, a zip archive whose members are all stored uncompressed. torch.load inflates
    a deflated member and allocates what its pickle declares, so a 1 MB value could make every rank allocate 1 GiB
    (deflate's ~1,000:1); stored members must be as long as torch expects, so nothing is larger than the file."""
    import io
    import zipfile

    where = folder / info.relative_path
    if info.length > MAX_VALUE_BYTES:
        raise CheckpointError(f"{where}: the value {fqn} is stored as {info.length:,} bytes, more than a non-tensor "
                              f"optimizer value needs ({MAX_VALUE_BYTES:,}); the DCP metadata is crafted or corrupt.")
    with open(where, "rb") as f:
        f.seek(info.offset)
        data = f.read(info.length)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        members = None
    if members is None or any(m.compress_type != zipfile.ZIP_STORED or m.file_size > info.length for m in members):
        raise CheckpointError(f"{where}: the value {fqn} is not a torch.save archive of stored members (a "
                              "compressed or foreign payload); refusing to load it.")
    for m in members:
        if m.filename.endswith("data.pkl") and not _tree_pickle(archive, m):
            raise CheckpointError(f"{where}: the value {fqn} is a pickle that refers back to what it built (memo "
                                  "GET/DUP: a value torch.save writes never does; nested copies make hashing it "
                                  "take forever); refusing to load it.")


_LEAVES = frozenset({"GLOBAL", "STACK_GLOBAL", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "BINSTRING",
                     "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "INT", "BININT", "BININT1",
                     "BININT2", "LONG", "LONG1", "LONG4", "BINFLOAT", "FLOAT"})  # opcodes that push no container
MAX_VALUE_PICKLE = 64 << 10  # the pickle of an optimizer value: a float, a tuple of floats, a small tensor


def _tree_pickle(archive, member) -> bool:
    """Whether the stored zip `member` of `archive` is a pickle of at most MAX_VALUE_PICKLE bytes without DUP and
    whose memo GETs fetch only leaves (a global, string or number: torch.save's list of tensors reuses its rebuild
    function and 'storage'): every container it builds then appears once, so what torch's weights-only unpickler builds and hashes
    (dict keys) is no larger than the pickle. With GETs, 400 bytes of tuples nested 12 deep (each holding 16
    copies of the one below) as a dict key hash 16^12 elements."""
    import pickletools

    if member.file_size > MAX_VALUE_PICKLE:
        return False
    try:
        payload = archive.read(member)  # stored (checked), so no larger than file_size
        globals_at, memo, previous = set(), 0, ""
        for op, arg, _ in pickletools.genops(payload):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                at = memo if op.name == "MEMOIZE" else int(arg)
                memo = max(memo, at + 1)
                if previous in _LEAVES:
                    globals_at.add(at)
            elif op.name == "DUP" or (op.name in ("GET", "BINGET", "LONG_BINGET") and int(arg) not in globals_at):
                return False
            previous = op.name
        return True
    except Exception:  # noqa: BLE001 - whatever malformed opcodes raise, it is not a pickle torch.save wrote
        return False



TRAINING_METADATA_BYTES = 1 << 30  # a training checkpoint has no manifest to size it by: 1 GiB (1T parameters, 1024 ranks)


def read_dcp_metadata(path: Path):
    """The checked `Metadata` of a training checkpoint's `.metadata` at `path` (torch DCP as accelerate, Trainer,
    torchtitan write it): the same allow-list and type checks as a state folder's, bounded by
    TRAINING_METADATA_BYTES; `formats.train_dcp` checks the storage it points at against its own folder."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (or not a regular file); a torch DCP checkpoint holds one.")
    return read_metadata(path.parent, limit=TRAINING_METADATA_BYTES)


def optimizer_state_entries(metadata) -> dict[str, dict]:
    """{parameter name: {state name ('exp_avg', 'step', ...): its DCP storage metadata}} from the metadata of an
    optimizer saved by `save_optimizer_distributed` (keys 'optimizer.state.<parameter>.<state name>')."""
    per_param: dict[str, dict] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("optimizer.state."):
            param, _, state_key = key.removeprefix("optimizer.state.").rpartition(".")
            per_param.setdefault(param, {})[state_key] = meta
    return per_param


def optimizer_summary(metadata) -> dict:
    """{"tensors": the optimizer's state tensors, "state_keys": their sorted state names}: what the manifest
    records and `tpcli verify STATE` checks."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = optimizer_state_entries(metadata)
    return {"tensors": sum(isinstance(m, TensorStorageMetadata) for e in entries.values() for m in e.values()),
            "state_keys": sorted({k for e in entries.values() for k in e})}


def check_tiles(where: Path, what: str, meta) -> None:
    """The saved chunks of one tensor tile its global box: no gap, no overlap (same rule as the weights)."""
    from tpcli.formats.dcp import Chunk, ShardedTensor, check_coverage

    t = ShardedTensor(name=f"optimizer tensor {what}", dtype="", shape=tuple(meta.size))
    t.chunks = [Chunk(t.name, -1, sm.OPTIMIZER_DIR, tuple(c.offsets), tuple(c.sizes), "") for c in meta.chunks]
    check_coverage(t, where.parent)

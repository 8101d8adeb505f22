"""A byte plan: everything `shard` or `gather` will write, decided before the first byte is read, as typed data.

    BytePlan
      files:    FilePlan (an output safetensors file: name, header metadata)
                  tensors: TensorPlan (name, dtype, shape), in file order, each either
                    boxes:  SourceBox... (copy these bytes of the source files as they are), or
                    None:   written by the plan's stream (read source tensors, convert, cast, write)
      aux:      config / tokenizer files copied from `aux_folder`
      config_dtype, strip_quantization: what is changed in the copied config.json
      manifest: tpcli.json to write (its "files" filled in once the files are hashed), or None
      index:    model.safetensors.index.json to write, or None
      headers:  {source file: [size, sha256 of its safetensors header]} the boxes were planned against

Every planner (shard of a checkpoint, reshard, gather from the manifest or through transformers, a training
checkpoint's gather) emits one; `tpcli.formats.executor.execute` writes any of them. A plan whose tensors all have
boxes is plain data: `to_json` / `from_json` keep it in `tpcli.formats.cache`, and `from_json` is the only
validation a cached plan gets (an entry on disk is never trusted): every field typed, every name plain, every box
inside its tensor and inside its source file, the boxes of a tensor tiling it exactly once, every source a regular
file inside the source folder whose header is still the one planned against.

A box is cut from, or placed into, a row-major array (`tpcli.formats.rankfile.box_run_starts` turns it into byte runs):

    box_in = "src":  the source holds the whole array of `shape` at byte `start`; the tensor is the dense box
                     [offsets, offsets + sizes)  (shard: one rank's chunk; sizes = the tensor's shape)
    box_in = "dest": the source holds the dense box at `start`; the tensor is the whole array (shape = the
                     tensor's shape) and its boxes tile it  (gather: every chunk placed into the full tensor)
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

BOX_IN = ("src", "dest")
MAX_RANK = 64  # dims of a tensor (safetensors allows any; transformers' tensors have at most a handful)


class Invalid(Exception):
    """A plan read back from disk is not one tpcli would have written for these inputs."""


@dataclass(frozen=True)
class SourceBox:
    """The bytes of one box of a row-major array in source file `file` (a name inside the plan's `source`)."""

    file: str
    start: int  # absolute byte offset of the source's data (the whole array, or the dense box: see box_in)
    shape: tuple[int, ...]  # the whole array
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    box_in: str  # "src" or "dest" (module docstring)

    def source_bytes(self, itemsize: int) -> int:
        """Bytes of the source file the box reads, from `start` on."""
        return math.prod(self.shape if self.box_in == "src" else self.sizes) * itemsize


@dataclass(frozen=True)
class TensorPlan:
    name: str
    dtype: str  # torch's name (float32, bfloat16, float8_e4m3fn, ...)
    shape: tuple[int, ...]
    boxes: tuple[SourceBox, ...] | None = None  # None: the plan's stream writes it


@dataclass(frozen=True)
class FilePlan:
    name: str  # a plain file name inside the output folder
    tensors: tuple[TensorPlan, ...]
    metadata: dict[str, str] | None = None  # the safetensors header's __metadata__

    @property
    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) per tensor, in file order: what `tensor_file.header_layout` lays out."""
        return [(t.name, t.dtype, t.shape) for t in self.tensors]


@dataclass(frozen=True)
class BytePlan:
    command: str  # "shard" or "gather": names the temporary folder and the errors
    label: str  # the progress bar's
    source: str  # absolute folder every box's file lies in
    files: tuple[FilePlan, ...]
    total: int  # bytes read, for the progress bar
    aux_folder: str
    aux: tuple[str, ...] = ()
    config_dtype: str | None = None
    strip_quantization: bool = False
    manifest: dict | None = None
    index: dict | None = None
    headers: dict[str, list] = field(default_factory=dict)

    @property
    def copies(self) -> bool:
        """True when every tensor is moved as bytes (no stream needed)."""
        return all(t.boxes is not None for f in self.files for t in f.tensors)

    @property
    def tensor_count(self) -> int:
        return sum(len(f.tensors) for f in self.files)

    def to_json(self) -> dict:
        """The plan as JSON-ready data; only a plan of byte copies (a stream is live code, not data)."""
        if not self.copies:
            raise ValueError("a plan with streamed tensors is not data; only byte-copy plans are stored")
        return {
            "command": self.command, "label": self.label, "source": self.source, "total": self.total,
            "aux_folder": self.aux_folder, "aux": list(self.aux), "config_dtype": self.config_dtype,
            "strip_quantization": self.strip_quantization, "manifest": self.manifest, "index": self.index,
            "headers": {f: list(d) for f, d in self.headers.items()},
            "files": [{"name": f.name, "metadata": f.metadata,
                       "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
                                    "boxes": [[b.file, b.start, list(b.shape), list(b.offsets), list(b.sizes),
                                               b.box_in] for b in t.boxes]} for t in f.tensors]}
                      for f in self.files],
        }

    @classmethod
    def from_json(cls, doc, *, source: Path, aux_folder: Path, command: str, output_name=None) -> BytePlan:
        """The plan in `doc`, validated (module docstring) for a run that reads `source` and copies config files
        from `aux_folder` (both resolved); `output_name(name) -> bool` further restricts the output file names.
        Raises Invalid for anything else, including a source whose size or header changed since planning."""
        from tpcli.formats.coverage import find_bad_tiling

        d = _fields(doc, ("command", "label", "source", "total", "aux_folder", "aux", "config_dtype",
                          "strip_quantization", "manifest", "index", "headers", "files"))
        _need(d["command"] == command and _str(d["label"]), "command")
        _need(d["source"] == str(source) and d["aux_folder"] == str(aux_folder), "source folder")
        _need(_int(d["total"]), "total")
        _need(d["config_dtype"] is None or _dtype(d["config_dtype"]), "config_dtype")
        _need(isinstance(d["strip_quantization"], bool), "strip_quantization")
        _need(d["manifest"] is None or isinstance(d["manifest"], dict), "manifest")
        _need(d["index"] is None or (isinstance(d["index"], dict) and isinstance(d["index"].get("weight_map"), dict)),
              "index")
        _need(isinstance(d["aux"], list) and all(_plain(a) for a in d["aux"]), "aux")
        sizes = _sources(d["headers"], source)
        files, names = [], set()
        for f in _list(d["files"], "files"):
            f = _fields(f, ("name", "metadata", "tensors"))
            _need(_plain(f["name"]) and f["name"].endswith(".safetensors") and f["name"] not in names
                  and (output_name is None or output_name(f["name"])), f"output file {f['name']!r}")
            names.add(f["name"])
            meta = f["metadata"]
            _need(meta is None or (isinstance(meta, dict) and all(_str(k) and _str(v) for k, v in meta.items())),
                  "metadata")
            tensors, seen = [], set()
            for t in _list(f["tensors"], "tensors"):
                t = _fields(t, ("name", "dtype", "shape", "boxes"))
                _need(_str(t["name"]) and t["name"] and t["name"] not in seen and t["name"] != "__metadata__",
                      "tensor name")
                seen.add(t["name"])
                _need(_dtype(t["dtype"]) and _shape(t["shape"]), f"{t['name']}: dtype or shape")
                shape = tuple(t["shape"])
                boxes = tuple(_box(b, sizes, _itemsize(t["dtype"])) for b in _list(t["boxes"], "boxes"))
                _check_cover(t["name"], shape, boxes, find_bad_tiling)
                tensors.append(TensorPlan(t["name"], t["dtype"], shape, boxes))
            files.append(FilePlan(f["name"], tuple(tensors), meta))
        _need(bool(files), "files")
        return cls(command=command, label=d["label"], source=d["source"], files=tuple(files), total=d["total"],
                   aux_folder=d["aux_folder"], aux=tuple(d["aux"]), config_dtype=d["config_dtype"],
                   strip_quantization=d["strip_quantization"], manifest=d["manifest"], index=d["index"],
                   headers={f: list(v) for f, v in d["headers"].items()})


def header_digest(path: Path) -> list:
    """[size, sha256 of the safetensors header]: what the byte offsets of a plan depend on in a source file
    (offsets into a file move only when its header changes, so its data bytes need not be compared)."""
    return _digest_and_data_start(path)[0]


def _digest_and_data_start(path: Path) -> tuple[list, int]:
    """(`header_digest(path)`, 8 + header length: the first byte a box may read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return [os.fstat(f.fileno()).st_size, hashlib.sha256(f.read(n)).hexdigest()], 8 + n


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise Invalid(what)


def _int(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _str(v) -> bool:
    return isinstance(v, str)


def _plain(v) -> bool:
    from tpcli.formats.source import is_plain_name

    return is_plain_name(v)


def _dtype(v) -> bool:
    from tpcli.formats.units import SAFETENSORS_CODES

    return isinstance(v, str) and v in SAFETENSORS_CODES


def _itemsize(dtype: str) -> int:
    from tpcli.formats.units import dtype_size

    return dtype_size(dtype)


def _shape(v) -> bool:
    return isinstance(v, list) and len(v) <= MAX_RANK and all(_int(x) for x in v)


def _list(v, what: str) -> list:
    _need(isinstance(v, list), what)
    return v


def _fields(entry, names: tuple[str, ...]) -> dict:
    _need(isinstance(entry, dict) and set(entry) == set(names),
          f"fields {sorted(entry) if isinstance(entry, dict) else type(entry).__name__}")
    return entry


def _sources(headers, folder: Path) -> dict[str, tuple[int, int]]:
    """headers: {plain file name: [size, sha256 hex]}, each a regular file inside `folder` whose size and header are
    still those; returns {file: (data start, size)}: the bytes past the header a box may read."""
    from tpcli.errors import TpcliError
    from tpcli.formats.source import check_inside

    _need(isinstance(headers, dict) and bool(headers), "headers")
    sizes = {}
    for f, d in headers.items():
        _need(_plain(f) and isinstance(d, list) and len(d) == 2 and _int(d[0]) and _str(d[1]), f"header entry {f!r}")
        try:
            check_inside(folder, folder / f, "weights")
            now, data_start = _digest_and_data_start(folder / f)
        except (TpcliError, OSError, struct.error) as exc:
            raise Invalid(str(exc)) from None
        _need(now == d, f"{f}: changed since planning")
        sizes[f] = (data_start, d[0])
    return sizes


def _box(b, sizes: dict[str, tuple[int, int]], itemsize: int) -> SourceBox:
    _need(isinstance(b, list) and len(b) == 6, "box")
    file, start, shape, offsets, box, box_in = b
    _need(file in sizes and _int(start, 8) and _shape(shape) and _shape(offsets) and _shape(box)
          and box_in in BOX_IN, "box fields")
    _need(len(shape) == len(offsets) == len(box)
          and all(o + s <= n for n, o, s in zip(shape, offsets, box, strict=True)), "box outside its array")
    out = SourceBox(file, start, tuple(shape), tuple(offsets), tuple(box), box_in)
    data_start, size = sizes[file]
    _need(start >= data_start, "box in its source file's header")
    _need(start + out.source_bytes(itemsize) <= size, "box outside its source file")
    return out


def _check_cover(name: str, shape: tuple[int, ...], boxes: tuple[SourceBox, ...], find_bad_tiling) -> None:
    """A tensor's boxes give each of its elements exactly once: one "src" box the tensor's size, or "dest" boxes
    of the tensor's shape that tile it."""
    _need(bool(boxes), f"{name}: no boxes")
    kinds = {b.box_in for b in boxes}
    _need(len(kinds) == 1, f"{name}: mixed boxes")
    if kinds == {"src"}:
        _need(len(boxes) == 1 and boxes[0].sizes == shape, f"{name}: box is not the tensor")
        return
    _need(all(b.shape == shape for b in boxes), f"{name}: boxes of another shape")
    _need(find_bad_tiling(shape, [(b.offsets, b.sizes) for b in boxes]) is None, f"{name}: boxes do not tile it")

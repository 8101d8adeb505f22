"""Validation of cached shard/gather jobs before use: a cache entry is data from disk, never trusted.

A cached job decides which bytes of which file go where, so before a hit is used every field must be present and
of its type, every name tpcli will create must be a plain file name (the rank files `shard` would name itself, or
`model*.safetensors` for `gather`), and every source must be a regular file directly inside the model folder
(`source.check_inside`: for a hub snapshot, a link into its `blobs`), whose byte ranges lie inside the file.
Anything else is a miss (`Invalid`), never an error: the job is then planned anew.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from tpcli.errors import TpcliError

_OUTPUT_NAME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


class Invalid(Exception):
    """The entry is not a job tpcli would have written for this input."""


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise Invalid(what)


def _int(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _ints(v, n: int | None = None) -> bool:
    return isinstance(v, list) and all(_int(x) for x in v) and (n is None or len(v) == n)


def _str(v) -> bool:
    return isinstance(v, str)


def _dtype(v) -> bool:
    from tpcli.formats.units import SAFETENSORS_CODES

    return v in SAFETENSORS_CODES


def _fields(entry, names: tuple[str, ...]) -> dict:
    _need(isinstance(entry, dict) and set(entry) == set(names), f"fields {sorted(entry) if isinstance(entry, dict) else entry!r}")
    return entry


def _sources(headers, folder: Path, absolute: bool) -> dict:
    """headers: {file: [size, sha256 hex]}; each file a plain name (or folder/name when `absolute`) of a regular
    file inside `folder`. Returns {file: size}."""
    from tpcli.formats.source import check_inside, is_plain_name

    _need(isinstance(headers, dict) and headers, "headers")
    sizes = {}
    for f, d in headers.items():
        _need(_str(f) and isinstance(d, list) and len(d) == 2 and _int(d[0]) and _str(d[1]), "header entry")
        path = Path(f)
        name = path.name if absolute else f
        _need(is_plain_name(name) and (path.parent == folder if absolute else True), f"source {f!r}")
        try:
            check_inside(folder, folder / name, "weights")
        except (TpcliError, OSError) as exc:
            raise Invalid(str(exc)) from None
        sizes[f] = d[0]
    return sizes


def _box_fits(shape, offsets, sizes) -> bool:
    return len(shape) == len(offsets) == len(sizes) and all(o + s <= n for n, o, s in zip(shape, offsets, sizes,
                                                                                          strict=True))


def shard_entry(entry, folder: Path, tp: int) -> None:
    """Raise Invalid unless `entry` is a `ShardJob` (as JSON) of the model folder `folder` (resolved) at `tp`."""
    from tpcli.formats.dcp import shard_file_name
    from tpcli.formats.units import dtype_size

    e = _fields(entry, ("rank_files", "doc", "summary", "src_path", "cast", "dequantized", "entries", "total",
                        "boxes", "headers"))
    _need(e["src_path"] == str(folder), "src_path")
    _need(e["cast"] is None or _dtype(e["cast"]), "cast")
    _need(isinstance(e["dequantized"], bool) and _int(e["entries"]) and _int(e["total"]), "counts")
    _need(isinstance(e["doc"], dict), "doc")
    s = e["summary"]
    _need(isinstance(s, dict) and {"source", "kind", "tensors", "unexpected_keys", "quantization", "warnings"} <= set(s)
          and isinstance(s["source"], dict) and _str(s["kind"]) and _int(s["tensors"])
          and isinstance(s["unexpected_keys"], list) and all(_str(k) for k in s["unexpected_keys"])
          and isinstance(s["warnings"], list)
          and all(isinstance(w, dict) and _str(w.get("message")) for w in s["warnings"]), "summary")
    q = s["quantization"]
    _need(q is None or (isinstance(q, dict) and _str(q.get("method")) and _str(q.get("representation"))
                        and isinstance(q.get("scales", []), list)
                        and (not q.get("block_size") or _ints(q["block_size"], 2))), "quantization")
    sizes = _sources(e["headers"], folder, absolute=True)
    rank_files, boxes = e["rank_files"], e["boxes"]
    _need(isinstance(rank_files, list) and len(rank_files) == tp and isinstance(boxes, list) and len(boxes) == tp,
          "ranks")
    for r, (rf, rb) in enumerate(zip(rank_files, boxes, strict=True)):
        _need(isinstance(rf, list) and len(rf) == 3 and rf[0] == shard_file_name(r), f"rank file {r}")
        entries, metadata = rf[1], rf[2]
        _need(metadata is None or (isinstance(metadata, dict) and all(_str(k) and _str(v) for k, v in metadata.items())),
              "metadata")
        _need(isinstance(entries, list) and isinstance(rb, list) and len(rb) == len(entries), "entries")
        for t, b in zip(entries, rb, strict=True):
            _need(isinstance(t, list) and len(t) == 3 and _str(t[0]) and _dtype(t[1]) and _ints(t[2]), "tensor")
            _need(isinstance(b, list) and len(b) == 6 and b[0] in sizes and _int(b[1]) and _ints(b[2])
                  and _ints(b[3]) and _ints(b[4]) and _int(b[5], 1), "box")
            path, start, shape, offsets, box, itemsize = b
            _need(box == t[2] and itemsize == dtype_size(t[1]) and _box_fits(shape, offsets, box), "box shape")
            _need(start + math.prod(shape) * itemsize <= sizes[path], "box bytes")


def gather_entry(entry, folder: Path) -> None:
    """Raise Invalid unless `entry` is a `GatherJob` (as JSON) of the sharded folder `folder` (resolved)."""
    from tpcli.formats.source import is_plain_name
    from tpcli.formats.units import dtype_size

    e = _fields(entry, ("per_file", "weight_map", "parameter_count", "total", "cast", "boxes", "headers"))
    _need(_int(e["parameter_count"]) and _int(e["total"]) and (e["cast"] is None or _dtype(e["cast"])), "counts")
    sizes = _sources(e["headers"], folder, absolute=False)
    per_file, boxes, weight_map = e["per_file"], e["boxes"], e["weight_map"]
    _need(isinstance(per_file, dict) and per_file and isinstance(boxes, dict) and set(boxes) == set(per_file), "files")
    _need(isinstance(weight_map, dict) and all(_str(k) and v in per_file for k, v in weight_map.items()), "weight_map")
    for f, entries in per_file.items():
        _need(is_plain_name(f) and _OUTPUT_NAME.fullmatch(f) is not None, f"output file {f!r}")
        _need(isinstance(entries, list) and isinstance(boxes[f], list) and len(boxes[f]) == len(entries), "entries")
        for t, chunks in zip(entries, boxes[f], strict=True):
            _need(isinstance(t, list) and len(t) == 3 and _str(t[0]) and _dtype(t[1]) and _ints(t[2]), "tensor")
            _need(isinstance(chunks, list), "chunks")
            for c in chunks:
                _need(isinstance(c, list) and len(c) == 4 and c[0] in sizes and _int(c[1]) and _ints(c[2])
                      and _ints(c[3]) and _box_fits(t[2], c[2], c[3]), "chunk")
                _need(c[1] + math.prod(c[3]) * dtype_size(t[1]) <= sizes[c[0]], "chunk bytes")


def model_record_entry(entry) -> bool:
    """A cached `folders.model_record`: {"architecture": str, "tensors": {name: {"shape": [int], "tied_to": str |
    None, "cut": int | None}}, "quantized": bool, "checkpoint": bool}, every tie naming a listed, untied tensor. Anything else: False."""
    try:
        _fields(entry, ("architecture", "tensors", "quantized", "checkpoint"))
        _need(_str(entry["architecture"]) and isinstance(entry["quantized"], bool)
              and isinstance(entry["checkpoint"], bool) and isinstance(entry["tensors"], dict), "record")
        for name, t in entry["tensors"].items():
            _fields(t, ("shape", "tied_to", "cut"))
            _need(_ints(t["shape"]), f"{name}.shape")
            _need(t["cut"] is None or (_int(t["cut"]) and t["cut"] < len(t["shape"])), f"{name}.cut")
            twin = t["tied_to"]
            _need(twin is None or (_str(twin) and twin in entry["tensors"]
                                   and entry["tensors"][twin]["tied_to"] is None), f"{name}.tied_to")
    except (Invalid, TypeError, KeyError):
        return False
    return True

"""Validation of what a cache entry holds besides a byte plan: a cache entry is data from disk, never trusted.

A cached shard/gather layout is a `BytePlan`, validated by its own `BytePlan.from_json` (every name plain, every box
inside its tensor and its source file, sources unchanged); what is checked here is the rest: the summary a cached
shard reports, and a cached `integrity.model_record`. Anything else is a miss (`Invalid`), never an error: the job
is then planned anew.
"""

from __future__ import annotations

import re

from tpcli.formats.byteplan import Invalid

OUTPUT_NAME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")  # the files `gather` writes


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise Invalid(what)


def _int(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _ints(v, n: int | None = None) -> bool:
    return isinstance(v, list) and all(_int(x) for x in v) and (n is None or len(v) == n)


def _str(v) -> bool:
    return isinstance(v, str)


def _fields(entry, names: tuple[str, ...]) -> dict:
    _need(isinstance(entry, dict) and set(entry) == set(names), f"fields {sorted(entry) if isinstance(entry, dict) else entry!r}")
    return entry


def shard_summary(s) -> None:
    """Raise Invalid unless `s` is the summary a cached shard job reports (source, kind, tensors, unexpected_keys,
    quantization, warnings); its plan is validated by `BytePlan.from_json`."""
    _need(isinstance(s, dict) and {"source", "kind", "tensors", "unexpected_keys", "quantization", "warnings"} <= set(s)
          and isinstance(s["source"], dict) and _str(s["kind"]) and _int(s["tensors"])
          and isinstance(s["unexpected_keys"], list) and all(_str(k) for k in s["unexpected_keys"])
          and isinstance(s["warnings"], list)
          and all(isinstance(w, dict) and _str(w.get("message")) for w in s["warnings"]), "summary")
    q = s["quantization"]
    _need(q is None or (isinstance(q, dict) and _str(q.get("method")) and _str(q.get("representation"))
                        and isinstance(q.get("scales", []), list)
                        and (not q.get("block_size") or _ints(q["block_size"], 2))), "quantization")


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

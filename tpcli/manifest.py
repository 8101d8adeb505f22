"""`tpcli.json`: what a sharded folder holds, how it was made, and how to check it.

Format (version 1), all keys always present:

    format            "tpcli.sharded"
    format_version    1
    versions          {"tpcli", "transformers", "torch"}
    source            {"spec", "path", "hub_id", "revision", "kind": "checkpoint" | "sharded"}
    tp_size           N
    architecture, model_type
    dtype             the --dtype cast, or null
    plan              {"rules": {pattern: style}, "user_plan": {...} | null, "source": str}
    tensors           {run-time name: {"style", "placement", "shape", "dtype", "tied_to",
                                       "chunks": [{"rank", "file", "offsets", "sizes"}]}}
    files             {file name: {"rank", "bytes", "sha256"}}
    quantization      null, or {"method", "block_size", ..., "representation", "scales"} (`tpcli.quant`)
    skipped_keys      checkpoint keys the model does not use (listed by `shard`, never silently dropped)
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointError

NAME = "tpcli.json"
FORMAT = "tpcli.sharded"
VERSION = 1


def versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {"tpcli": __version__, "transformers": transformers.__version__, "torch": torch.__version__}


def build(*, source: dict, tp: int, plan, tensors: list, chunks: list[list], dtype: str | None,
          files: dict) -> dict:
    """The manifest of a sharded folder: `tensors` are TensorInfo, `chunks` the per-rank dcp.Chunk lists."""
    by_name: dict[str, list] = {}
    for rank_chunks in chunks:
        for c in rank_chunks:
            by_name.setdefault(c.name, []).append(
                {"rank": c.rank, "file": c.file, "offsets": list(c.offsets), "sizes": list(c.sizes)})
    return {
        "format": FORMAT,
        "format_version": VERSION,
        "versions": versions(),
        "source": source,
        "tp_size": tp,
        "architecture": plan.architecture,
        "model_type": plan.model_type,
        "dtype": dtype,
        "plan": {"rules": plan.rules, "user_plan": plan.user_rules or None, "source": plan.plan_source},
        "tensors": {
            t.name: {"style": t.style, "placement": t.placement.describe(), "shape": list(t.shape), "dtype": t.dtype,
                     "tied_to": t.tied_to, "chunks": sorted(by_name.get(t.name, []), key=lambda c: c["rank"])}
            for t in tensors
        },
        "files": files,
    }


def user_plan(manifest: dict | None) -> dict | None:
    """The --plan a sharded folder was made with (None: the model's own plan, or no manifest)."""
    return (manifest or {}).get("plan", {}).get("user_plan")


def write(folder: Path, manifest: dict) -> None:
    (folder / NAME).write_text(json.dumps(manifest, indent=1) + "\n")


def read(folder: Path) -> dict | None:
    """The manifest of `folder`, or None when there is none (e.g. a plain transformers DCP save)."""
    path = folder / NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); restore it or re-run `tpcli shard`.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tpcli manifest (format {data.get('format') if isinstance(data, dict) else '?'}).")
    if data.get("format_version") != VERSION:
        raise CheckpointError(f"{path}: manifest version {data.get('format_version')} is not supported by this tpcli.")
    for key in ("tp_size", "tensors", "files", "plan"):
        if key not in data:
            raise CheckpointError(f"{path}: manifest lacks {key!r}; re-run `tpcli shard`.")
    return data

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
    quantization      null, or {"method", "block_size", ..., "representation", "scales"} (`tpcli.planning.quant`)
    skipped_keys      checkpoint keys the model does not use (listed by `shard`, never silently dropped)

Optional (absent from manifests written before it; readers then take the path through transformers):

    pp_size           P > 1 for a pipeline folder (`shard --pp P --tp T`): P x T rank files, rank p x T + t holding
                      only the tensors of stage p (`tpcli.planning.pipeline`), each cut for TP rank t (whole at
                      T = 1); absent otherwise
    names             {"checkpoint": bool, "config_sha256": str}, written for a folder that is not quantized:
                      the sha256 of the config.json `shard` wrote beside the rank files, and whether the run-time
                      names are the checkpoint names (transformers has no conversion to revert). With it, `gather`
                      and `verify DIR` plan from the manifest (`tpcli.formats.manifest_gather`); what it says is a
                      hint, checked against transformers' own record of config.json (cached) and the rank files.
"""

from __future__ import annotations

import json
from pathlib import Path

from tpcli.errors import CheckpointError
from tpcli.formats.jsonfile import read_json

NAME = "tpcli.json"
FORMAT = "tpcli.sharded"
VERSION = 1


def versions() -> dict[str, str]:
    import torch
    import transformers

    from tpcli import __version__

    return {"tpcli": __version__, "transformers": transformers.__version__, "torch": torch.__version__}


def build(*, source: dict, tp: int, plan, tensors: list, chunks: list[list], dtype: str | None,
          files: dict, pp: int = 1) -> dict:
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
        **({"pp_size": pp} if pp > 1 else {}),
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
    """The manifest of `folder`, or None when there is none (e.g. a plain transformers DCP save).

    The schema is checked here, once, for every reader (integrity, reshard, gather, load_model): types of every
    field their code uses, and file names that are plain names listed under `files`, so no reader can be sent
    outside the folder. A malformed manifest raises one CheckpointError naming the field.
    """
    from tpcli.formats.source import check_inside

    path = folder / NAME
    if not path.exists() and not path.is_symlink():
        return None
    check_inside(folder, path, "the manifest")  # a link out of the folder is refused, as rank files are
    data = read_json(path, what="the sharded folder's manifest", fix="restore it or re-run `tpcli shard`")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tpcli manifest (format {data.get('format') if isinstance(data, dict) else '?'}).")
    if data.get("format_version") != VERSION:
        raise CheckpointError(f"{path}: manifest version {data.get('format_version')} is not supported by this tpcli.")
    for key in ("tp_size", "tensors", "files", "plan"):
        if key not in data:
            raise CheckpointError(f"{path}: manifest lacks {key!r}; re-run `tpcli shard`.")
    _validate(path, data)
    return data


def _validate(path: Path, data: dict) -> None:
    from tpcli.formats.source import is_plain_name

    def bad(field: str, want: str):
        raise CheckpointError(f"{path}: field {field} must be {want}; the manifest is corrupt or was edited.")

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not count(data["tp_size"]) or data["tp_size"] < 1:
        bad("tp_size", "a positive integer")
    pp = data.get("pp_size", 1)
    if not count(pp) or pp < 1:
        bad("pp_size", "a positive integer")
    world = data["tp_size"] * pp
    if not isinstance(data["plan"], dict) or not isinstance(data["plan"].get("user_plan") or {}, dict):
        bad("plan", "an object (with user_plan an object or null)")
    if data.get("dtype") is not None and not isinstance(data["dtype"], str):
        bad("dtype", "a string or null")
    names = data.get("names")
    if names is not None and not (isinstance(names, dict) and isinstance(names.get("checkpoint"), bool)
                                  and isinstance(names.get("config_sha256"), str)):
        bad("names", "an object with a boolean checkpoint and a string config_sha256")
    files = data["files"]
    if not isinstance(files, dict):
        bad("files", "an object")
    for name, f in files.items():
        if not is_plain_name(name):
            bad(f"files[{name!r}]", "named by a plain file name inside the folder")
        if not isinstance(f, dict) or not count(f.get("rank")) or not count(f.get("bytes")) \
                or not isinstance(f.get("sha256"), str):
            bad(f"files[{name!r}]", "an object with integer rank and bytes and a string sha256")
    ranks = sorted(f["rank"] for f in files.values())
    if len(ranks) != world or ranks != list(range(len(ranks))):  # the count first: tp_size may be 10^12
        bad("files", f"one rank file per rank 0..{world - 1} (tp_size {data['tp_size']} x pp_size {pp}; it lists "
                     f"{len(ranks)} file(s), ranks {ranks[:8]}{' ...' if len(ranks) > 8 else ''})")
    if not isinstance(data["tensors"], dict):
        bad("tensors", "an object")
    for name, t in data["tensors"].items():
        where = f"tensors[{name!r}]"
        if not isinstance(t, dict):
            bad(where, "an object")
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(count(d) for d in shape):
            bad(f"{where}.shape", "a list of non-negative integers")
        if not isinstance(t.get("dtype"), str):
            bad(f"{where}.dtype", "a string")
        if t.get("tied_to") is not None and not isinstance(t["tied_to"], str):
            bad(f"{where}.tied_to", "a string or null")
        chunks = t.get("chunks")
        if not isinstance(chunks, list):
            bad(f"{where}.chunks", "a list")
        for i, c in enumerate(chunks):
            field = f"{where}.chunks[{i}]"
            if not isinstance(c, dict) or not count(c.get("rank")) or c["rank"] >= world:
                bad(field, "an object with an integer rank below tp_size x pp_size")
            if not is_plain_name(c.get("file")) or c["file"] not in files:
                bad(f"{field}.file", "a file name listed under files")
            for key in ("offsets", "sizes"):
                v = c.get(key)
                if not isinstance(v, list) or len(v) != len(shape) or not all(count(x) for x in v):
                    bad(f"{field}.{key}", f"a list of {len(shape)} non-negative integers")

"""`gather` and `verify DIR` from `tpcli.json`, the rank files' headers and transformers' record of config.json.

A tpcli folder's manifest lists every tensor with its shape, dtype, tied_to and chunks, and the rank files' headers
(`DCP_SHARDING_INFO`, data_offsets) say where each chunk's bytes lie. What only transformers knows is

  1. which tensors config.json's model has (names, shapes, ties): `verify DIR`'s config check, and
  2. which checkpoint names the run-time names revert to (fused MoE experts, ...): `gather`'s names.

Whoever can write the folder can rewrite tpcli.json and refresh every hash in it (nothing is signed), so neither
is taken from the manifest: `folders.model_record` asks transformers (the meta model of config.json) and keeps
the answer in tpcli's private cache (`tpcli.formats.cache`, keyed by the folder's files, config.json's bytes
included), so only the first look at a folder imports torch and transformers. The rank files must then hold exactly
that model's tensors, and a tensor is left out of the output only where config.json ties it and the bytes agree
(`folders.check_names`). The manifest's `names` record (`config_sha256`, `checkpoint`) only decides whether
this path is tried at all:

    vouched  = names present, config.json's sha256 = names.config_sha256,
               installed transformers version = versions.transformers (names and conversions change with it)
    mergeable = vouched and the record says: not quantized, no conversion to revert (and names.checkpoint),
                and every tensor's dtype is the --dtype cast (or no cast)

Anything else (an older manifest, a transformers DCP save, an edited config, a quantized folder, a conversion)
takes the general path through transformers. The chunks, shapes and dtypes the fast path uses are the ones
`folders.ShardedFolder.open` has checked against the manifest (`_compare_manifest`) before this module plans.

The plan is today's general-path plan with transformers' parts replaced by what they reduce to without a
conversion: `revert_weight_conversion` is the identity, its groups are one name each in `dot_natural_key` order,
and huggingface_hub's `split_state_dict_into_shards_factory` (pure Python) splits the same sizes in the same order.
tests/test_manifest_gather.py checks the output byte for byte against the general path on every architecture the
suite shards; tests/test_manifest_trust.py, that a forged manifest or config.json is refused.
"""

from __future__ import annotations

from pathlib import Path

from tpcli.formats.rankfile import data_spans


def installed_transformers() -> str | None:
    """The installed transformers version, from its metadata (importing it costs seconds)."""
    from tpcli.formats.cache import installed_version

    return installed_version("transformers")


def config_sha256(folder: Path) -> str | None:
    """sha256 of `folder`/config.json; None when it is missing. A FIFO (reading it waited forever), device or link
    out of the folder is refused first (`source.check_inside`), as every other file of a sharded folder is."""
    from tpcli.formats.hashing import sha256_file
    from tpcli.formats.source import check_inside

    path = Path(folder) / "config.json"
    if not path.exists() and not path.is_symlink():
        return None
    check_inside(Path(folder), path, "config files")
    try:
        return sha256_file(path)
    except OSError:
        return None


def why_not_vouched(folder: Path, meta: dict | None) -> str | None:
    """None when the manifest vouches for config.json (see the module docstring), else why not (one phrase)."""
    if meta is None:
        return "no tpcli.json (a transformers DCP save)"
    names = meta.get("names")
    if names is None:
        return "the manifest has no 'names' record (written by an older tpcli)"
    if config_sha256(folder) != names["config_sha256"]:
        return "config.json differs from the one written by `tpcli shard`"
    versions = meta.get("versions")
    recorded = versions.get("transformers") if isinstance(versions, dict) else None
    if recorded != installed_transformers():
        return f"sharded with transformers {recorded}, {installed_transformers()} is installed"
    return None


def why_not_mergeable(folder: Path, meta: dict | None, cast: str | None, record: dict) -> str | None:
    """None when `gather` may merge `folder` as bytes from its manifest and `record` (`folders.model_record`:
    transformers' verdict on config.json, never the manifest's own word), else why not."""
    why = why_not_vouched(folder, meta)
    if why:
        return why
    if record["quantized"]:
        return "config.json's model is quantized"
    if not record["checkpoint"] or not meta["names"]["checkpoint"]:
        return "its run-time names are not its checkpoint names (transformers reverts a conversion)"
    if cast and any(t["dtype"] != cast for t in meta["tensors"].values()):
        return "--dtype casts its tensors"
    tensors = meta["tensors"]
    for name, t in tensors.items():  # a tie leaves a tensor out of the output: it must name a twin it can leave
        twin = tensors.get(t["tied_to"]) if t["tied_to"] else t
        if twin is None or twin["tied_to"] or (twin["shape"], twin["dtype"]) != (t["shape"], t["dtype"]):
            return f"{name} is tied to {t['tied_to']!r}, which the manifest does not list as its twin"
    return None


def dot_natural_key(s: str) -> list:
    """transformers.core_model_loading.dot_natural_key (the order of `reverse_groups`), without importing it:
    split on '.', digits numerically, a trailing number of a word numerically (tests compare the two).

    "Digits" are ASCII digits: transformers' `str.isdigit` is also true for '²' (then `int('²')` raises); a name
    holding one never reaches here (`dcp.scan` refuses it), and if one did it would sort as text, not crash."""
    parts: list[tuple] = []
    for part in s.split("."):
        if part.isascii() and part.isdigit():
            parts.append((0, int(part)))
        else:
            text = part.rstrip("0123456789")
            digits = part[len(text):]
            parts.append((1, text, int(digits)) if digits else (1, text))
    return parts


def plan(folder: Path, meta: dict, tensors: dict, record: dict, *, max_shard_size) -> tuple[tuple, int, int]:
    """(files, parameter_count, total): the output files of a mergeable folder, each tensor with the boxes of its
    chunks (`byteplan.FilePlan`), the model's parameter count and the bytes read; `commands.gather.gather_plan`
    makes the byte plan of them, as it does of the general path's `plan_job` for a folder without conversions.

    `tensors` is `dcp.scan`'s result (state order of the rank files, chunks from their headers), already checked
    against the manifest and against `record` (`folders.check_names`: config.json's names, shapes and ties, the
    ties proven by the bytes). What is left out as tied is what `record` ties, not what the manifest says.
    """
    from huggingface_hub import split_state_dict_into_shards_factory  # public, lazy: no torch

    from tpcli.formats.byteplan import FilePlan, SourceBox, TensorPlan

    recorded = record["tensors"]
    names = [n for n in tensors if n in recorded and not recorded[n]["tied_to"]]
    sizes = {n: tensors[n].nbytes for n in names}
    split = split_state_dict_into_shards_factory(
        sizes, get_storage_size=lambda nbytes: nbytes, get_storage_id=lambda nbytes: None,
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    file_of = {n: f for f, ns in split.filename_to_tensors.items() for n in ns}
    spans = {f: data_spans(Path(folder) / f) for f in {c.file for n in names for c in tensors[n].chunks}}
    per_file: dict[str, list] = {f: [] for f in split.filename_to_tensors}
    for n in sorted(names, key=dot_natural_key):  # reverse groups of one name each, in transformers' order
        t = tensors[n]
        shape = tuple(t.shape)
        per_file[file_of[n]].append(TensorPlan(n, t.dtype, shape, tuple(
            SourceBox(c.file, spans[c.file][n][0], shape, tuple(c.offsets), tuple(c.sizes), "dest") for c in t.chunks)))
    files = tuple(FilePlan(f, tuple(ts), {"format": "pt"}) for f, ts in per_file.items() if ts)
    parameter_count = sum(_numel(recorded[n]["shape"]) for n in recorded if not recorded[n]["tied_to"])
    return files, parameter_count, sum(sizes.values())


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

"""Training state (model + optimizer + step) saved at one mesh and resumed at another: `tpcli.save_state`,
`tpcli.load_state`.

Both are collective: every rank of the job calls them (plain TP, TP x FSDP, replicas, EP; or one process
without torch.distributed). The folder (see `tpcli.formats.state_manifest`) holds

- the parameters in transformers' pre-sharded layout (`save_pretrained(distributed_checkpoint=True)`: DCP's
  HuggingFace storage, one safetensors file per rank, global shapes and chunk offsets in the file metadata), so
  `tpcli gather`, `tpcli verify` and `from_pretrained` read it at any mesh;
- the optimizer state in `optimizer/` through transformers' `save_optimizer_distributed` (torch DCP,
  `get_optimizer_state_dict(flatten_optimizer_state_dict=True)`: keyed by parameter name, not by group index, so
  a mesh that groups parameters differently still finds each one's state);
- `tpcli-state.json`: step, extra, the mesh, the model's tensor signature and a sha256 per file.

Resharding is DCP's: a load plans, for each tensor this rank holds at the new mesh (a DTensor's local shard, or a
whole tensor in one process), the overlapping chunks of the saved files and reads exactly those. Before anything
is read into the model, `load_state` checks the manifest, every file's size and sha256 (spread over the ranks),
that the saved tensors are exactly the model's (names, global shapes, dtypes, chunks tiling each tensor) and that
the optimizer's tensors are exactly those this optimizer holds: any mismatch is a CheckpointError naming the file
or tensor, raised on every rank, with no parameter changed.

The optimizer's `.metadata` is a pickle; tpcli reads it once, with `tpcli.formats.dcp_metadata` (an exact
allow-list of classes; every byte range it names inside a file of optimizer/ the manifest lists), hands that
checked object to torch, and reads the non-tensor values (learning rates, betas) with
`torch.load(weights_only=True)`: a state folder from someone else cannot run code or make tpcli read outside it
when loaded or verified.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tpcli.adapters.torch_api import local_tensor
from tpcli.errors import CheckpointError, OutputError, TpcliError, UsageError
from tpcli.formats import state_manifest as sm
from tpcli.formats.dcp_metadata import (
    check_storage,
    check_tiles,
    metadata_limit,
    optimizer_summary,
    read_metadata,
)
from tpcli.formats.hashing import sha256_file
from tpcli.formats.output import Words
from tpcli.runtime.folders import StateFolder

SAVE_STATE_WORDS = Words(out="save_state:", another="path", force="overwrite=True")  # the output checks' errors

# --------------------------------------------------------------------------------------------------- collectives


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj):
    """rank 0's `obj` on every rank (a plain return in one process)."""
    import torch.distributed as dist

    if _world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj) -> list:
    import torch.distributed as dist

    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _agree(fn, *args):
    """Run `fn` on every rank; if any rank raised, raise that rank's error on every rank (so no rank is left
    waiting in a collective the others skipped). Returns this rank's result."""
    try:
        result, error = fn(*args), None
    except (CheckpointError, UsageError, OSError) as exc:
        result, error = None, (type(exc).__name__, str(exc))
    errors = [e for e in _all_gather(error) if e is not None]
    if errors:
        kind, message = errors[0]
        raise (UsageError if kind == "UsageError" else CheckpointError)(message)
    return result


def _spread_hashes(folder: Path, names: list[str]) -> list[str]:
    """sha256 of `names`, rank r hashing names[r::world]; every rank gets all of them."""
    rank, world = _world()
    mine = _agree(lambda: {n: sha256_file(folder / n) for n in names[rank::world]})
    merged: dict[str, str] = {}
    for part in _all_gather(mine):
        merged.update(part)
    return [merged[n] for n in names]


# ------------------------------------------------------------------------------------------------ what is saved


def _model_entries(model_sd: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, global shape, dtype) of every tensor of a state dict (a DTensor's shape is its global shape)."""
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model_sd.items()
            if hasattr(v, "shape")]


def _optimizer_state(model, optimizer) -> dict:
    """The optimizer's state keyed by parameter name (what `save_optimizer_distributed` writes); torch creates
    the state of a fresh optimizer first (a step with zero gradients and lr 0: the parameters do not change)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))


def _mesh_of(model) -> dict:
    from tpcli.runtime.meshinfo import mesh_info

    _, world = _world()
    if world == 1:
        return {"tp": 1, "fsdp": 1, "dp_replicate": 1, "ep": 1}
    mesh = mesh_info(model).mesh
    return {k: getattr(mesh, k) for k in sm.MESH_KEYS}


def _check_extra(extra) -> None:
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"save_state: extra= must be JSON-serializable (dicts, lists, numbers, strings): {exc}; "
                         "convert tensors with .tolist() or .item().") from None


# ------------------------------------------------------------------------------------------------------- saving


def save_state(path, model, optimizer, *, step: int, extra=None, overwrite: bool = False) -> Path:
    """Save `model`'s parameters, `optimizer`'s state, `step` and `extra` (JSON) into the folder `path`.

    Collective: call it on every rank of the job (or in one process). Everything is written into a temporary
    sibling folder (`.NAME.tpcli-tmp-*`) and renamed to `path` once complete and hashed, so a crash mid-save never
    leaves a folder that looks complete. An existing `path` is an error, unless `overwrite=True` and it is a
    tpcli output (an earlier save). Multi-node jobs need `path` on storage every node sees. Returns `path`."""
    from tpcli.adapters.transformers_api import save_optimizer_distributed
    from tpcli.formats import output
    from tpcli.formats.manifest import versions

    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UsageError(f"save_state: step={step!r}: pass the number of optimizer steps taken (an int >= 0).")
    _check_extra(extra)
    rank, world = _world()
    out = Path(path).expanduser().absolute()

    def prepare():
        out.parent.mkdir(parents=True, exist_ok=True)  # as save_pretrained does
        out_resolved = output.prepare_output(out, force=overwrite, words=SAVE_STATE_WORDS)
        output.remove_stale_temps(out_resolved.parent)
        return str(output.temp_folder(out_resolved, "save_state")), str(out_resolved)

    def publish():
        output.publish(tmp, out_resolved, command="save_state", force=overwrite, words=SAVE_STATE_WORDS)

    # rank 0 makes the temporary folder; every rank learns its name, or rank 0's error
    tmp, out_resolved = map(Path, _raised_on_all(_broadcast(_try(prepare) if rank == 0 else None)))
    try:
        model_sd_entries = _save_model(model, tmp, rank)
        save_optimizer_distributed(model, optimizer, str(tmp / sm.OPTIMIZER_DIR))
        names = sorted(p.relative_to(tmp).as_posix() for p in _written_files(tmp))
        digests = _spread_hashes(tmp, names)
        if rank == 0:
            doc = {
                "format": sm.FORMAT, "format_version": sm.VERSION, "versions": versions(),
                "step": step, "extra": extra, "mesh": _mesh_of(model),
                "model": {"model_type": model.config.model_type,
                          "architectures": list(getattr(model.config, "architectures", None) or []),
                          "tensors": len(model_sd_entries), "signature": sm.signature(model_sd_entries)},
                "optimizer": {"class": type(optimizer).__name__,
                              **optimizer_summary(read_metadata(tmp / sm.OPTIMIZER_DIR))},
                "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": d} for n, d in zip(names, digests, strict=True)},
            }
            sm.write(tmp, doc)
            _fsync_tree(tmp)
        _raised_on_all(_broadcast(_try(publish) if rank == 0 else None))
    except BaseException:
        if rank == 0:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_resolved


def _try(fn) -> dict:
    """{"ok": fn()}, or {"error": message} for a tpcli/OS error: rank 0's outcome, broadcast to all ranks."""
    try:
        return {"ok": fn()}
    except (TpcliError, OSError) as exc:
        return {"error": str(exc)}


def _raised_on_all(outcome: dict):
    """The value of a `_try` outcome; its error raised (as an OutputError) on every rank that received it."""
    if "error" in outcome:
        raise OutputError(outcome["error"])
    return outcome["ok"]


def _save_model(model, tmp: Path, rank: int) -> list:
    """The parameters in the DCP HuggingFace layout (what `save_pretrained(distributed_checkpoint=True)` writes,
    and, in one process, where transformers' writer refuses an unsharded model, the same writer); returns the
    (name, global shape, dtype) entries.

    Tied parameters (`tie_word_embeddings`: lm_head.weight is model.embed_tokens.weight) are saved under both
    names, as transformers' own DCP save does, so every reader finds the tensors the model's state dict names.
    safetensors refuses two names over one storage; transformers' save only gets through when the local shard is
    a view of a larger buffer (DCP then copies it), which is the case after `from_pretrained` but not after
    tpcli's loader or in one process: `_unaliased` copies every alias after the first explicitly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from tpcli.adapters.transformers_api import redistribute_state_dict

    state_dict = get_model_state_dict(model)
    entries = _model_entries(state_dict)
    if rank == 0:  # before dcp.save, whose closing collective then orders it before every rank lists the folder
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
    writer = HuggingFaceStorageWriter(path=str(tmp), save_distributed=True, enable_consolidation=False)
    dcp.save(_unaliased(redistribute_state_dict(state_dict)), storage_writer=writer)
    return entries


def _unaliased(state_dict: dict) -> dict:
    """`state_dict` with every tensor whose (local) storage an earlier entry already uses replaced by a copy
    (a DTensor's copy keeps its mesh and placements: `DTensor.clone` copies the local shard, no communication)."""
    seen: set[int] = set()
    out = {}
    for name, value in state_dict.items():
        local = local_tensor(value)
        ptr = local.untyped_storage().data_ptr() if hasattr(local, "untyped_storage") else 0
        if ptr and ptr in seen:
            value = value.detach().clone()
        elif ptr:
            seen.add(ptr)
        out[name] = value
    return out


def _written_files(tmp: Path) -> list[Path]:
    from tpcli.formats.output import TEMP_MARKER

    files = [p for p in tmp.iterdir() if p.is_file() and p.name not in (TEMP_MARKER, sm.NAME)]
    files += [p for p in (tmp / sm.OPTIMIZER_DIR).iterdir() if p.is_file()]
    return files


def _fsync_tree(folder: Path) -> None:
    for p in [*folder.rglob("*"), folder]:  # every file and folder below it (optimizer/ included), then itself
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------------------ loading


def load_state(path, model, optimizer, *, check_hashes: bool = True) -> dict:
    """Restore `model`'s parameters and `optimizer`'s state from a `save_state` folder, at this job's mesh
    (any mesh: DCP reshards). Collective. Returns {"step", "extra", "mesh"} (mesh: the one it was saved on).

    Checked before anything is read into the model (each a CheckpointError naming the file or tensor, on every
    rank): the manifest; each file's size and (unless `check_hashes=False`) sha256; that the saved parameters
    are exactly the model's (names, global shapes, dtypes; chunks tile each tensor); that the saved optimizer
    tensors are exactly the ones `optimizer` holds for this model (same names, shapes and dtypes; an optimizer of
    another kind or with other parameters is refused)."""
    folder = Path(path).expanduser()
    # opened once on every rank, as `verify STATE` opens it (its hashes spread over the ranks below): the manifest,
    # the listed files at their sizes, the rank files' tensors tiling and equal to the manifest's model signature
    state = _agree(lambda: StateFolder.open(folder, quick=True, optimizer=False))
    doc = state.doc
    if check_hashes:
        names = sorted(doc["files"])
        digests = _spread_hashes(folder, names)
        _agree(sm.check_hashes, folder, doc, names, digests)

    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model_sd = get_model_state_dict(model)
    _agree(_check_model, state, _model_entries(model_sd), model.config.model_type)
    optim_sd = _optimizer_state(model, optimizer)
    metadata = _agree(_check_optimizer, folder, doc, optim_sd, (doc["optimizer"]["class"], type(optimizer).__name__))

    from tpcli.adapters.transformers_api import load_model_checkpoint_distributed

    load_model_checkpoint_distributed(model, folder, strict=True)
    _load_optimizer(model, optimizer, folder / sm.OPTIMIZER_DIR, optim_sd, metadata)
    return {"step": doc["step"], "extra": doc["extra"], "mesh": doc["mesh"]}


def _check_model(state, entries: list, model_type: str) -> None:
    """The saved parameters (`state`: the `StateFolder` opened, its rank files' chunks tiling each tensor) are
    exactly the model's: same names, global shapes, dtypes."""
    folder, doc, saved = state.path, state.doc, state.tensors
    manifest = folder / sm.NAME
    if doc["model"]["model_type"] != model_type:
        raise CheckpointError(f"{manifest}: saved from a {doc['model']['model_type']} model, this model is "
                              f"{model_type}: load the state into the model it was saved from.")
    have = {name: (shape, dtype) for name, shape, dtype in entries}
    for name, (shape, dtype) in sorted(have.items()):
        t = saved.get(name)
        if t is None:
            raise CheckpointError(f"{folder}: parameter {name} is not in the saved state (saved from another "
                                  "model?); nothing was loaded.")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise CheckpointError(f"{folder / t.chunks[0].file}: {name} is saved as {t.dtype} {list(t.shape)}, the "
                                  f"model has {dtype} {list(shape)}; nothing was loaded.")
    extra = sorted(set(saved) - set(have))
    if extra:
        raise CheckpointError(f"{folder / saved[extra[0]].chunks[0].file}: holds {extra[0]}, which this model does "
                              f"not have ({len(extra)} such tensors; saved from another model?); nothing was loaded.")
    if doc["model"]["signature"] != sm.signature(entries):
        raise CheckpointError(f"{manifest}: the model signature differs from this model's; nothing was loaded.")


def _check_optimizer(folder: Path, doc: dict, optim_sd: dict, classes: tuple[str, str]):
    """The DCP metadata, read from allowed classes only, points only at byte ranges inside the optimizer files the
    manifest lists (`dcp_metadata.check_storage`); the saved optimizer tensors are exactly the ones this optimizer
    holds (name, global shape, dtype), each tiled by its chunks, and every saved non-tensor value (lr, betas, ...)
    exists here. `classes`: (saved, this) optimizer class names, for the message. Returns the checked metadata:
    the one torch then loads with (not a second read of the file)."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    where = folder / sm.OPTIMIZER_DIR
    metadata = read_metadata(where, limit=metadata_limit(doc))
    check_storage(where, doc, metadata)
    saved = {k.removeprefix("optimizer."): v for k, v in metadata.state_dict_metadata.items()}
    hint = (f"saved with {classes[0]}, this optimizer is {classes[1]}" if classes[0] != classes[1] else
            "saved for other parameters?")
    # state tensors first (exp_avg, momentum_buffer, ...): they name what differs best; then group values
    for key, value in sorted(optim_sd.items(), key=lambda kv: (not kv[0].startswith("state."), kv[0])):
        meta = saved.get(key)
        what = key.replace("state.", "", 1) if key.startswith("state.") else key
        if meta is None:
            kind = "tensor" if isinstance(value, torch.Tensor) else "entry"
            raise CheckpointError(f"{where}: optimizer {kind} {what} is missing ({hint}); nothing was loaded.")
        if isinstance(value, torch.Tensor):
            if not isinstance(meta, TensorStorageMetadata):
                raise CheckpointError(f"{where}: optimizer entry {what} is saved as a value, this optimizer holds a "
                                      "tensor; nothing was loaded.")
            if tuple(meta.size) != tuple(value.shape) or meta.properties.dtype != value.dtype:
                raise CheckpointError(f"{where}: optimizer tensor {what} is saved as "
                                      f"{str(meta.properties.dtype).removeprefix('torch.')} {list(meta.size)}, this "
                                      f"optimizer holds {str(value.dtype).removeprefix('torch.')} "
                                      f"{list(value.shape)}; nothing was loaded.")
            check_tiles(where, what, meta)
    extra = sorted(set(saved) - set(optim_sd))
    if extra:
        raise CheckpointError(f"{where}: holds optimizer entry {extra[0]} that this optimizer does not have "
                              f"({len(extra)} such; {hint}); nothing was loaded.")
    return metadata


def _load_optimizer(model, optimizer, folder: Path, optim_sd: dict, metadata) -> None:
    """transformers' `load_optimizer_distributed`, with the metadata `_check_optimizer` checked and tpcli's
    planner."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from tpcli.adapters.transformers_api import redistribute_state_dict

    state = redistribute_state_dict(optim_sd)
    dcp.load({"optimizer": state}, storage_reader=_checked_reader(folder, metadata), planner=_safe_planner())
    state = redistribute_state_dict(state, reference_state_dict=optim_sd)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(flatten_optimizer_state_dict=True))


# ------------------------------------------------------------------------------ reading DCP files safely


def _checked_reader(folder: Path, meta):
    """torch's FileSystemReader over `folder`, handing torch `meta` (read and checked before: torch never
    unpickles `.metadata` itself, nor reads it again after the checks)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    return CheckedReader(str(folder))


def _safe_planner():
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from tpcli.adapters.torch_api import set_element

    class SafePlanner(DefaultLoadPlanner):
        """Non-tensor values (lr, betas, ...) through torch.load(weights_only=True), not a full unpickle."""

        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()

"""`tpcli gather`: merge a sharded folder (tpcli's or transformers' DCP save) into a standard checkpoint.

open and check the folder -> plan (a `tpcli.formats.byteplan.BytePlan`) -> `tpcli.formats.executor.execute` ->
report. Three planners give the plan: the manifest (`tpcli.formats.manifest_gather.plan`: no torch, no
transformers), the layout cache (a plan stored by an earlier run, validated by `BytePlan.from_json`), and
transformers (`plan_job`): files split with huggingface_hub's `split_state_dict_into_shards_factory` over the
run-time tensors, as `save_pretrained` does, each reverse-conversion group reverted on the meta device for its
checkpoint names (`lay_out_files`). Where nothing is reverted or cast, every tensor is its chunks' bytes put in
place; otherwise `GatherStream` assembles one group at a time, reverts it with transformers' converters, and the
executor appends it to its file. `gather_plan` is the tail every planner shares (index, config dtype, aux files).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from tpcli.commands import Progress, no_progress
from tpcli.errors import CheckpointError, UsageError
from tpcli.formats import dcp, manifest
from tpcli.formats.byteplan import BytePlan, FilePlan, Invalid, SourceBox, TensorPlan, header_digest
from tpcli.formats.executor import Written, execute
from tpcli.formats.heap import reuse_freed_memory
from tpcli.formats.output import prepare_output, remove_stale_temps
from tpcli.formats.source import aux_files
from tpcli.formats.units import CAST_DTYPES, parse_dtype, tensor_bytes
from tpcli.planning import saved_mesh
from tpcli.planning.readers import ShardedReader
from tpcli.runtime.folders import ShardedFolder

SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class GatherJob:
    """What `gather` writes: `plan`, decided before the first byte is read. A plan of byte copies (no conversion to
    revert, nothing cast) is plain data, cached by `tpcli.formats.cache` (keyed by the folder's manifest, config and
    file sizes/mtimes, checked against the rank files' headers before use), so gathering the same folder again needs
    neither torch nor transformers; otherwise `stream` reverts each conversion group with transformers."""

    plan: BytePlan
    stream: GatherStream | None = None


class GatherStream:
    """The general path: assemble each reverse-conversion group (`reader.read(group)`: run-time name -> whole
    tensor), cast it, revert it with transformers, and hand each checkpoint tensor to its output file."""

    def __init__(self, reader, groups: list[list[str]], conv, cast: str | None, file_of: dict[str, str]):
        self.reader, self.groups, self.conv, self.cast, self.file_of = reader, groups, conv, cast, file_of

    def run(self, write, advance) -> None:
        from tpcli.formats.executor import cast_tensor

        for group in self.groups:
            full = self.reader.read(group)
            if self.cast:  # before reverting, as transformers' save of a model loaded in that dtype
                full = {n: cast_tensor(t, self.cast) for n, t in full.items()}
            tensor = None
            for key, tensor in self.conv.revert(full).items():
                write(self.file_of[key], key, tensor)
            del full, tensor  # the loop variable would keep this group alive while the next is read
            advance(self.reader.step_bytes(group))

    def close(self) -> None:
        self.reader.close()


def gather_plan(source: Path, files: tuple[FilePlan, ...], *, parameter_count: int, total: int, cast: str | None,
                aux_folder: Path | None = None, headers: dict | None = None) -> BytePlan:
    """The byte plan of a gather whose output files are `files` (every planner's common tail): config and tokenizer
    copied from `aux_folder` (default `source`), config.json's dtype set to `cast`, and an index when there are
    several files (total_size: the bytes of every tensor; total_parameters: the model's own count)."""
    aux_folder = aux_folder or source
    index = None
    if len(files) > 1:
        total_size = sum(tensor_bytes(t.dtype, t.shape) for f in files for t in f.tensors)
        index = {"metadata": {"total_parameters": parameter_count, "total_size": total_size},
                 "weight_map": dict(sorted((t.name, f.name) for f in files for t in f.tensors))}
    return BytePlan(command="gather", label="gather", source=str(source), files=files, total=total,
                    aux_folder=str(aux_folder),
                    aux=tuple(p.name for p in aux_files(aux_folder) if p.name != manifest.NAME),
                    config_dtype=cast, index=index, headers=headers or {})


def cached_job(entry: dict | None, folder: Path) -> GatherJob | None:
    """The cached job of the sharded folder `folder` (resolved), if its plan passes `BytePlan.from_json`'s
    validation (rank files unchanged since planning, output names `model*.safetensors`); else None (replan)."""
    from tpcli.formats.cache_check import OUTPUT_NAME

    if not isinstance(entry, dict) or set(entry) != {"plan"}:
        return None
    try:
        return GatherJob(BytePlan.from_json(entry["plan"], source=folder, aux_folder=folder, command="gather",
                                            output_name=OUTPUT_NAME.fullmatch))
    except Invalid:
        return None


def gather_checkpoint(directory: str, *, out: str, max_shard_size: str | int = "5GB", dtype: str | None = None,
                      force: bool = False, progress: Progress = no_progress, byte_copy: bool = True,
                      config: str | None = None) -> dict:
    """Write `out`: a standard checkpoint (one file or index-sharded) merged from the rank files; returns a summary.

    Where transformers has no conversion to revert and nothing is cast, every output tensor is its chunks' bytes
    put in place (`tpcli.formats.bytecopy`); byte_copy=False forces the general path (tests compare the two).
    A training checkpoint (torch DCP, verl's per-rank files) goes through `tpcli.commands.gather_train`, with
    `config` naming the model it was trained from."""
    from tpcli.formats import cache
    from tpcli.formats.train_folder import is_train_folder

    started = time.perf_counter()
    folder = Path(directory).expanduser().resolve()
    if not folder.is_dir():
        raise CheckpointError(f"DIR {directory}: " + ("is a file, not a folder" if folder.exists() else "no such folder")
                              + "; pass a folder written by `tpcli shard` or save_pretrained(distributed_checkpoint=True).")
    if not dcp.is_sharded_dir(folder) and is_train_folder(folder):
        from tpcli.commands.gather_train import gather_train

        return gather_train(directory, config=config, out=out, max_shard_size=max_shard_size, dtype=dtype,
                            force=force, progress=progress)
    if config is not None:
        raise UsageError("--config names the model of a training checkpoint (DCP or model_world_size_W_rank_R.pt); "
                         f"{directory} is a sharded folder with its own config.json: drop --config.")
    if not dcp.is_sharded_dir(folder):
        raise CheckpointError(f"DIR {directory}: no shard-*-model-*.safetensors files, DCP .metadata or "
                              "model_world_size_W_rank_R.pt files; pass a folder written by `tpcli shard`, "
                              "save_pretrained(distributed_checkpoint=True), dcp.save or verl.")
    cast = parse_dtype(dtype, "--dtype", allowed=CAST_DTYPES)
    out_path = prepare_output(out, force=force, inputs=[folder])
    # opened once: paths, sizes, headers, coverage now (a training state's model files hashed too); the rank files'
    # hashes run alongside the gather and are checked before the output is published (it is written into a
    # temporary folder), so a corrupt input never yields an output.
    checked = ShardedFolder.open(folder, quick=False, defer_hashes=True)
    removed = remove_stale_temps(out_path.parent)
    job = _manifest_job(checked, max_shard_size=max_shard_size, cast=cast) if byte_copy else None
    if job is not None:
        job, checked = job
        path = "manifest"
    else:
        key = cache.key("gather", {"target": str(folder), "max_shard_size": max_shard_size, "dtype": cast},
                        sharded=True) if byte_copy else None
        job = cached_job(cache.get(key), folder)
        path = "cache" if job is not None else "transformers"
        if job is None:
            checked = checked.with_plan()  # config.json's model through transformers: names and ties proven
            reuse_freed_memory()
            job = plan_job(checked, max_shard_size=max_shard_size, cast=cast, byte_copy=byte_copy)
            if job.stream is None:
                cache.put(key, {"plan": job.plan.to_json()})
    saved = saved_mesh.saved_by(checked)  # the mesh it was saved on: recorded, or inferred from its layout
    written = execute(job.plan, out_path, force=force, progress=progress, check_inputs=checked.check_hashes,
                      stream=job.stream)
    return {
        "out": str(out_path),
        "source": str(folder),
        "source_kind": checked.kind,
        # a training state: its step and mesh; its optimizer state is not part of the output
        "state": _state_summary(checked.state),
        # how the output was laid out: "manifest" (tpcli.json + headers, no torch/transformers), "transformers"
        # (planned through its conversions now), "cache" (a layout transformers planned for this folder before)
        "path": path,
        "tp_size": saved_mesh.tp_size(saved),  # None: the layout does not determine it (see saved_by)
        "saved_by": saved,
        **written_report(job.plan, written, removed, started),
    }


def written_report(plan: BytePlan, written: Written, removed, started: float) -> dict:
    """The part of a gather's report that says what was written (every source kind ends its report with it)."""
    files = {name: size for name, (size, _) in written.files.items()}
    return {
        "tensors": plan.tensor_count,
        "files": files,
        "copied": written.copied,
        "bytes_written": sum(files.values()),
        "removed_temp_folders": removed,
        "seconds": round(time.perf_counter() - started, 3),
    }

def _state_summary(state) -> dict | None:
    """For a training-state folder (`tpcli.save_state`, its model files checked by `ShardedFolder.open`: sizes,
    sha256, signature): {"step", "mesh", "optimizer_left_out"}; None for any other folder."""
    from tpcli.formats import state_manifest as sm

    if state is None:
        return None
    doc = state.doc
    left = sorted(n for n in doc["files"] if n.startswith(sm.OPTIMIZER_DIR + "/"))
    return {"step": doc["step"], "mesh": doc["mesh"], "mesh_text": sm.mesh_text(doc["mesh"]),
            "optimizer_left_out": {"files": len(left), "bytes": sum(doc["files"][n]["bytes"] for n in left)}}


def _manifest_job(checked: ShardedFolder, *, max_shard_size,
                  cast: str | None) -> tuple[GatherJob, ShardedFolder] | None:
    """(job, folder) planned from tpcli.json and the rank files' headers, when the manifest vouches for it
    (`tpcli.formats.manifest_gather`) and transformers' record of config.json (`folders.model_record`, cached)
    agrees with the rank files (the folder returned has its names proven against it); None: plan through
    transformers."""
    from tpcli.formats import manifest_gather
    from tpcli.runtime.folders import model_record

    folder, meta = checked.path, checked.manifest
    if manifest_gather.why_not_vouched(folder, meta) is not None:
        return None
    record = model_record(folder, meta)  # transformers' verdict on config.json (cached), not the manifest's word
    if manifest_gather.why_not_mergeable(folder, meta, cast, record) is not None:
        return None
    checked = checked.with_record(record)
    files, parameter_count, total = manifest_gather.plan(folder, meta, checked.tensors, record,
                                                         max_shard_size=max_shard_size)
    return GatherJob(gather_plan(folder, files, parameter_count=parameter_count, total=total, cast=cast)), checked


def plan_job(checked: ShardedFolder, *, max_shard_size, cast: str | None, byte_copy: bool = True) -> GatherJob:
    """Names, files and layout of the output, through transformers' reverse conversions (nothing written yet);
    `checked` was opened `with_plan`."""
    from tpcli.planning.convert import Conversions

    folder = checked.path
    reader = ShardedReader(folder, tensors=checked.tensors)
    plan = checked.plan
    if cast and plan.quantization is not None:  # a cast of FP8 bytes without their scales would be garbage
        raise UsageError(f"--dtype with the quantized folder {folder}: gather keeps the {plan.quantization.method} "
                         "weights and scales as they are; to dequantize, run `tpcli shard --dtype` on the gathered "
                         "checkpoint.")
    names = [n for n in reader.tensors if n in plan.tensors and not plan.tensors[n].tied_to]
    missing = [n for n, t in plan.tensors.items() if not t.tied_to and n not in reader.tensors]
    if missing:
        raise CheckpointError(f"{folder}: no shard holds {missing[0]}" +
                              (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "") + "; is the folder complete?")
    for n in names:
        if reader.tensors[n].shape != plan.tensors[n].shape:
            raise CheckpointError(f"{folder}: {n} has shape {list(reader.tensors[n].shape)} in the shards but "
                                  f"{list(plan.tensors[n].shape)} in config.json.")

    conv = Conversions(plan.model)
    tensors = {n: (reader.tensors[n].shape, reader.tensors[n].dtype) for n in names}
    files, groups = lay_out_files(tensors, conv, cast=cast, max_shard_size=max_shard_size)
    total = sum(tensor_bytes(dtype, shape) for shape, dtype in tensors.values())
    if not (byte_copy and not conv.reverts and all(cast in (None, reader.tensors[n].dtype) for n in names)):
        stream = GatherStream(reader, groups, conv, cast, {t.name: f.name for f in files for t in f.tensors})
        return GatherJob(gather_plan(folder, files, parameter_count=plan.parameter_count, total=total, cast=cast),
                         stream)
    # every output tensor is a run-time tensor as stored: its chunks' bytes only need to be put in place
    try:
        files = tuple(FilePlan(f.name, tuple(
            replace(t, boxes=tuple(SourceBox(c.file, reader.handle(folder / c.file).offset(t.name), t.shape,
                                             tuple(c.offsets), tuple(c.sizes), "dest")
                                   for c in reader.tensors[t.name].chunks)) for t in f.tensors), f.metadata)
                      for f in files)
        headers = {f: header_digest(folder / f) for f in checked.files}
    finally:
        reader.close()
    return GatherJob(gather_plan(folder, files, parameter_count=plan.parameter_count, total=total, cast=cast,
                                 headers=headers))


def lay_out_files(tensors: dict[str, tuple[tuple[int, ...], str]], conv, *, cast: str | None,
                  max_shard_size) -> tuple[tuple[FilePlan, ...], list[list[str]]]:
    """(files, groups): the output files of the run-time tensors {name: (shape, dtype)}, as `save_pretrained` splits
    them, each reverse-conversion group reverted on the meta device to get checkpoint names, shapes and dtypes
    (tensors without boxes: the stream writes them, or the caller adds their boxes)."""
    import torch
    from huggingface_hub import split_state_dict_into_shards_factory

    groups = conv.reverse_groups(list(tensors))
    meta = {n: torch.empty(shape, dtype=getattr(torch, cast or dtype), device="meta")
            for n, (shape, dtype) in tensors.items()}
    split = split_state_dict_into_shards_factory(
        meta, get_storage_size=lambda t: t.numel() * t.element_size(), get_storage_id=lambda t: None,
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    file_of_runtime = {n: f for f, ts in split.filename_to_tensors.items() for n in ts}
    per_file: dict[str, list[TensorPlan]] = {f: [] for f in split.filename_to_tensors}
    for group in groups:
        reverted = conv.revert({n: meta[n] for n in group})
        per_file[file_of_runtime[group[0]]].extend(
            TensorPlan(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in reverted.items())
    return tuple(FilePlan(f, tuple(ts), {"format": "pt"}) for f, ts in per_file.items() if ts), groups

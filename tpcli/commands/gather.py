"""`tpcli gather`: merge a sharded folder (tpcli's or transformers' DCP save) into a standard checkpoint.

Streaming: one reverse-conversion group at a time is assembled from its chunks, reverted to checkpoint names by
transformers' `revert_weight_conversion`, and appended to its output file. Files are split with
huggingface_hub's `split_state_dict_into_shards_factory` over the run-time tensors, as `save_pretrained` does, and
every output file's header is laid out (by a meta-device dry run) before the first byte is read.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from tpcli.commands import Progress, no_progress
from tpcli.commands.shard import cast_tensor, metadata_allowance, set_config_dtype
from tpcli.errors import CheckpointError, UsageError
from tpcli.formats import bytecopy, dcp, manifest
from tpcli.formats.bytecopy import CachedJob, header_digest
from tpcli.formats.heap import reuse_freed_memory
from tpcli.formats.output import atomic_dir, check_free_space, copy_aux, prepare_output, remove_stale_temps
from tpcli.formats.source import aux_files
from tpcli.formats.tensor_file import StreamWriter, file_size
from tpcli.formats.units import CAST_DTYPES, parse_dtype, tensor_bytes
from tpcli.planning import saved_mesh
from tpcli.planning.readers import ShardedReader
from tpcli.runtime.folders import ShardedFolder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class GatherJob(CachedJob):
    """Everything `gather` writes, decided before the first byte is read.

    `boxes` (output file -> per tensor, the JSON-ready `bytecopy.Box` of each chunk) is set when no conversion is
    reverted and nothing is cast: the job is then plain data, cached by `tpcli.formats.cache` (keyed by the folder's
    manifest, config and file sizes/mtimes, checked against the rank files' headers before use), so gathering the
    same folder again needs neither torch nor transformers. Otherwise `live` holds what the general path needs."""

    per_file: dict  # output file -> [(checkpoint name, dtype, shape)] in file order
    weight_map: dict
    parameter_count: int
    total: int  # bytes read, for the progress bar
    cast: str | None
    boxes: dict | None = None
    headers: dict | None = None  # rank file -> (size, sha256 of its header)
    live: tuple | None = None  # (reader, groups, conversions)


def gather_checkpoint(directory: str, *, out: str, max_shard_size: str | int = "5GB", dtype: str | None = None,
                      force: bool = False, progress: Progress = no_progress, byte_copy: bool = True,
                      config: str | None = None) -> dict:
    """Write `out`: a standard checkpoint (one file or index-sharded) merged from the rank files; returns a summary.

    Where transformers has no conversion to revert and nothing is cast, every output tensor is its chunks' bytes
    put in place (`tpcli.formats.bytecopy`); byte_copy=False forces the general path (tests compare the two).
    A training checkpoint (torch DCP, verl's per-rank files) goes through `tpcli.commands.gather_train`, with
    `config` naming the model it was trained from."""
    from tpcli.formats import cache, cache_check
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
        job = GatherJob.from_cache(cache.get(key), folder, check=lambda e: cache_check.gather_entry(e, folder))
        path = "cache" if job is not None else "transformers"
        if job is None:
            checked = checked.with_plan()  # config.json's model through transformers: names and ties proven
            reuse_freed_memory()
            job = plan_job(checked, max_shard_size=max_shard_size, cast=cast, byte_copy=byte_copy)
            if job.boxes is not None:
                cache.put(key, job.to_json())
    saved = saved_mesh.saved_by(checked)  # the mesh it was saved on: recorded, or inferred from its layout
    files, copied = write_job(job, folder, out_path, checked.check_hashes, progress=progress,
                               force=force)
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
        **written_report(job, files, copied, removed, started),
    }



def written_report(job, files: dict, copied, removed, started: float) -> dict:
    """The part of a gather's report that says what was written (every source kind ends its report with it)."""
    return {
        "tensors": len(job.weight_map),
        "files": files,
        "copied": copied,
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
    fields = manifest_gather.plan(folder, meta, checked.tensors, record, max_shard_size=max_shard_size)
    return GatherJob(**fields, cast=cast), checked


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
    job, groups = lay_out_job({n: (reader.tensors[n].shape, reader.tensors[n].dtype) for n in names}, conv,
                              max_shard_size=max_shard_size, cast=cast, parameter_count=plan.parameter_count)
    if not (byte_copy and not conv.reverts and all(cast in (None, reader.tensors[n].dtype) for n in names)):
        job.live = (reader, groups, conv)
        return job
    # every output tensor is a run-time tensor as stored: its chunks' bytes only need to be put in place
    job.boxes = {f: [[[c.file, *_chunk_start(reader, folder, c.file, name), list(c.offsets), list(c.sizes)]
                      for c in reader.tensors[name].chunks] for name, _, _ in entries]
                 for f, entries in job.per_file.items()}
    job.headers = {f: header_digest(folder / f) for f in checked.files}
    reader.close()
    return job


def lay_out_job(tensors: dict[str, tuple[tuple[int, ...], str]], conv, *, max_shard_size, cast: str | None,
                parameter_count: int) -> tuple[GatherJob, list[list[str]]]:
    """(job, groups): the output files of the run-time tensors {name: (shape, dtype)}, as `save_pretrained` splits
    them, each reverse-conversion group reverted on the meta device to get checkpoint names and shapes."""
    import torch
    from huggingface_hub import split_state_dict_into_shards_factory

    groups = conv.reverse_groups(list(tensors))
    meta = {n: torch.empty(shape, dtype=getattr(torch, cast or dtype), device="meta")
            for n, (shape, dtype) in tensors.items()}
    outputs: list[list[tuple[str, tuple[int, ...], str]]] = []
    for group in groups:
        reverted = conv.revert({n: meta[n] for n in group})
        outputs.append([(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in reverted.items()])

    split = split_state_dict_into_shards_factory(
        meta, get_storage_size=lambda t: t.numel() * t.element_size(), get_storage_id=lambda t: None,
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    file_of_runtime = {n: f for f, ts in split.filename_to_tensors.items() for n in ts}
    per_file: dict[str, list[tuple[str, str, tuple[int, ...]]]] = {f: [] for f in split.filename_to_tensors}
    weight_map: dict[str, str] = {}
    for group, outs in zip(groups, outputs, strict=True):
        file = file_of_runtime[group[0]]
        for key, shape, dt in outs:
            per_file[file].append((key, dt, shape))
            weight_map[key] = file
    total = sum(tensor_bytes(dtype, shape) for shape, dtype in tensors.values())
    return GatherJob(per_file={f: e for f, e in per_file.items() if e}, weight_map=weight_map,
                     parameter_count=parameter_count, total=total, cast=cast), groups


def _chunk_start(reader: ShardedReader, folder: Path, file: str, name: str) -> list[int]:
    return [reader.handle(folder / file).offset(name)]


def write_job(job: GatherJob, folder: Path, out_path: Path, check_hashes, *, progress: Progress,
              force: bool = False, aux_folder: Path | None = None) -> tuple[dict, list]:
    """Write the output files, index, config and tokenizer into a temporary folder and publish it as `out_path`.

    `check_hashes()` runs after the last byte is written and before publishing: it raises when an input was corrupt
    or changed. Config and tokenizer files come from `aux_folder` (default: `folder`)."""
    aux = [p for p in aux_files(aux_folder or folder) if p.name != manifest.NAME]
    check_free_space(out_path, sum(file_size(e, {"format": "pt"}) for e in job.per_file.values()) +
                     sum(f.stat().st_size for f in aux) + metadata_allowance(len(job.weight_map)))
    with atomic_dir(out_path, command="gather", force=force) as tmp:
        writers = {}
        reader = job.live[0] if job.live else None
        try:
            if job.boxes is not None:
                outputs = []
                for f, entries in job.per_file.items():
                    out_file, starts = bytecopy.lay_out(tmp / f, entries, {"format": "pt"})
                    for (name, dt, shape), chunks in zip(entries, job.boxes[f], strict=True):
                        out_file.units.append([
                            bytecopy.Box(folder / file, start, starts[name], tuple(shape), tuple(offsets),
                                         tuple(sizes), tensor_bytes(dt, (1,)), box_in="dest")
                            for file, start, offsets, sizes in chunks])
                    outputs.append(out_file)
                with progress(job.total, "gather") as bar:
                    bytecopy.write_files(outputs, sha256=False, advance=bar.advance)
            else:
                _, groups, conv = job.live
                writers = {f: StreamWriter(tmp / f, entries, {"format": "pt"}, sha256=False)
                           for f, entries in job.per_file.items()}
                _stream(reader, groups, conv, job.cast, writers, job.weight_map, job.total, progress)
            check_hashes()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        finally:
            if reader is not None:
                reader.close()
        if len(job.per_file) > 1:
            total_size = sum(tensor_bytes(dt, shape) for entries in job.per_file.values() for _, dt, shape in entries)
            index = {"metadata": {"total_parameters": job.parameter_count, "total_size": total_size},
                     "weight_map": dict(sorted(job.weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        copied = copy_aux(aux_folder or folder, tmp, aux)
        if job.cast:
            set_config_dtype(tmp / "config.json", job.cast)
        files = {f: (tmp / f).stat().st_size for f in job.per_file}
    return files, copied


def _stream(reader, groups, conv, cast, writers, weight_map, total: int, progress: Progress) -> None:
    """The general path: assemble each reverse-conversion group, revert it with transformers, append it."""
    with progress(total, "gather") as bar:
        for group in groups:
            full = reader.read(group)
            if cast:
                full = {n: cast_tensor(t, cast) for n, t in full.items()}
            tensor = None
            for key, tensor in conv.revert(full).items():
                writers[weight_map[key]].write(key, tensor)
            del full, tensor  # the loop variable would keep this group alive while the next is read
            bar.advance(reader.step_bytes(group))
    for w in writers.values():
        w.close()


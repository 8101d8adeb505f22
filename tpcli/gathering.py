"""`tpcli gather`: merge a sharded folder (tpcli's or transformers' DCP save) into a standard checkpoint.

Streaming: one reverse-conversion group at a time is assembled from its chunks, reverted to checkpoint names by
transformers' `revert_weight_conversion`, and appended to its output file. Files are split with
huggingface_hub's `split_state_dict_into_shards_factory` over the run-time tensors, as `save_pretrained` does, and
every output file's header is laid out (by a meta-device dry run) before the first byte is read.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import dcp, manifest
from .errors import CheckpointError, UsageError
from .integrity import check_folder
from .plan import tensor_bytes
from .readers import ShardedReader
from .sharding import _cast, _set_config_dtype, metadata_allowance, parse_dtype
from .source import aux_files
from .storage import (
    StreamWriter,
    atomic_dir,
    check_free_space,
    copy_aux,
    file_size,
    prepare_output,
    remove_stale_temps,
    reuse_freed_memory,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def gather_checkpoint(directory: str, *, out: str, max_shard_size: str | int = "5GB", dtype: str | None = None,
                      force: bool = False, progress: bool = False) -> dict:
    import torch
    from huggingface_hub.serialization._base import split_state_dict_into_shards_factory

    from .render import progress_bar

    started = time.perf_counter()
    folder = Path(directory).expanduser().resolve()
    if not dcp.is_sharded_dir(folder):
        raise CheckpointError(f"DIR {directory}: no shard-*-model-*.safetensors files; pass a folder written by "
                              "`tpcli shard` or save_pretrained(distributed_checkpoint=True).")
    cast = parse_dtype(dtype)
    out_path = prepare_output(out, force=force, inputs=[folder])
    removed = remove_stale_temps(out_path.parent)
    reuse_freed_memory()
    # sizes, headers, coverage, config agreement now; the hashes run alongside the gather and are checked before the
    # output is published (it is written into a temporary folder), so a corrupt input never yields an output.
    integrity = check_folder(folder, quick=False, with_plan=True, defer_hashes=True)
    reader = ShardedReader(folder, tensors=integrity["tensors"])
    plan = integrity["plan"]
    model = plan.model
    if cast and plan.quantization is not None:  # a cast of FP8 bytes without their scales would be garbage
        raise UsageError(f"--dtype with the quantized folder {directory}: gather keeps the {plan.quantization.method} "
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

    from .convert import Conversions

    conv = Conversions(model)
    groups = conv.reverse_groups(names)
    meta = {n: torch.empty(reader.tensors[n].shape, dtype=getattr(torch, cast or reader.tensors[n].dtype),
                           device="meta") for n in names}
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
    per_file = {f: e for f, e in per_file.items() if e}
    aux = [p for p in aux_files(folder) if p.name != manifest.NAME]
    check_free_space(out_path, sum(file_size(e, {"format": "pt"}) for e in per_file.values()) +
                     sum(f.stat().st_size for f in aux) + metadata_allowance(len(weight_map)))

    with atomic_dir(out_path, command="gather") as tmp:
        writers = {f: StreamWriter(tmp / f, entries, {"format": "pt"}, sha256=False) for f, entries in per_file.items()}
        try:
            total = sum(reader.step_bytes(n) for n in names)
            with progress_bar(total, "gather", progress) as bar:
                for group in groups:
                    full = reader.read(group)
                    if cast:
                        full = {n: _cast(t, cast) for n, t in full.items()}
                    tensor = None
                    for key, tensor in conv.revert(full).items():
                        writers[weight_map[key]].write(key, tensor)
                    del full, tensor  # the loop variable would keep this group alive while the next is read
                    bar.advance(reader.step_bytes(group))
            for w in writers.values():
                w.close()
            integrity["check_hashes"]()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        finally:
            reader.close()
        if len(writers) > 1:
            total_size = sum(tensor_bytes(dt, shape) for entries in per_file.values() for _, dt, shape in entries)
            index = {"metadata": {"total_parameters": plan.parameter_count, "total_size": total_size},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        copied = copy_aux(folder, tmp, aux)
        if cast:
            _set_config_dtype(tmp / "config.json", cast)
        files = {f: (tmp / f).stat().st_size for f in writers}
    return {
        "out": str(out_path),
        "source": str(folder),
        "source_kind": "tpcli" if integrity["manifest"] else "transformers-dcp",
        "tp_size": integrity["tp_size"],
        "tensors": len(weight_map),
        "files": files,
        "copied": copied,
        "bytes_written": sum(files.values()),
        "removed_temp_folders": removed,
        "seconds": round(time.perf_counter() - started, 3),
    }


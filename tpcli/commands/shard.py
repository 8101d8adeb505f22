"""`tpcli shard`: stream a checkpoint into per-rank files in transformers' pre-sharded (DCP) layout.

No process group and no model in RAM: every run-time tensor is read once (through transformers' converters),
cut into each rank's contiguous chunk, and appended to that rank's file. Peak memory is about one conversion
group (the largest fused tensor) plus its chunks. The same engine reshards a sharded folder N -> M.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tpcli.commands import Progress, no_progress
from tpcli.commands.integrity import check_folder, check_names, record_of
from tpcli.errors import CheckpointError, UsageError
from tpcli.formats import bytecopy, dcp, manifest, manifest_gather
from tpcli.formats import source as sources
from tpcli.formats.bytecopy import CachedJob, header_digest
from tpcli.formats.heap import reuse_freed_memory
from tpcli.formats.jsonfile import read_json
from tpcli.formats.output import atomic_dir, check_free_space, copy_aux, prepare_output, remove_stale_temps
from tpcli.formats.tensor_file import StreamWriter, file_size
from tpcli.formats.units import CAST_DTYPES, parse_dtype, tensor_bytes
from tpcli.planning import pipeline
from tpcli.planning.checks import require_valid
from tpcli.planning.layout import plan_chunks
from tpcli.planning.plan import ResolvedPlan, load_config, load_plan_file, resolve_plan
from tpcli.planning.quant import quantization_record, strip_quantization_config
from tpcli.planning.readers import CheckpointReader, ShardedReader


def metadata_allowance(entries: int) -> int:
    """Bytes to reserve for what is written after the weights (tpcli.json or index.json, markers): ~200 B per
    chunk or key in practice; 512 B each plus 4 KB keeps the free-space check on the safe side."""
    return 4096 + 512 * entries


def open_source(model: str, *, plan_file: str | None, revision: str | None, cast: str | None = None):
    """(Source, ResolvedPlan, reader, kind, check_hashes) for an ordinary checkpoint or a sharded folder.

    A quantized checkpoint is opened in its stored representation, or with `cast` in the dequantized one (the
    tensors transformers' load without an FP8 GPU produces, in dtype `cast`).
    A sharded folder passes `verify`'s integrity check first (manifest schema, sizes, headers, coverage); its hashes
    run alongside the reshard, and `check_hashes()` (a no-op for a checkpoint) must pass before the output is
    published, so resharding never turns a corrupt folder into a valid-looking one.
    """
    local = Path(model).expanduser()
    if dcp.is_sharded_dir(local):
        integrity = check_folder(local, defer_hashes=True)
        meta = integrity["manifest"]
        user_plan = load_plan_file(plan_file) if plan_file else manifest.user_plan(meta)
        if not (local / "config.json").is_file():
            raise CheckpointError(f"{local / 'config.json'} is missing; a sharded folder needs the model's config.")
        plan = resolve_plan(load_config(local), user_plan=user_plan, plan_file=plan_file)
        check_names(local, meta, integrity["tensors"], record_of(plan))  # config.json's model, ties proven by bytes
        if plan.quantization is not None and cast:
            raise UsageError(f"--dtype with the quantized sharded folder {model}: dequantizing is done from the "
                             "original checkpoint; run `tpcli gather` first, then `tpcli shard --dtype` on its output.")
        reader = ShardedReader(local, tensors=integrity["tensors"])
        src = sources.Source(spec=model, path=local.resolve())
        return src, plan, reader, "sharded", integrity["check_hashes"]
    src = sources.resolve(model, revision=revision, weights=True)
    weights = sources.weight_files(src)  # before transformers is imported: a folder without weights fails at once
    user_plan = load_plan_file(plan_file) if plan_file else None
    plan = resolve_plan(load_config(src.path), user_plan=user_plan, plan_file=plan_file, dequantize=bool(cast),
                        dtype=cast)
    reader = CheckpointReader(plan.model, weights)
    check_kept_keys(reader, src.path)
    return src, plan, reader, "checkpoint", lambda: None


def check_kept_keys(reader: CheckpointReader, where: Path) -> None:
    """Refuse before writing when a scale (or zero point, packed block) would be lost: one the model cannot place
    although its weight is kept, or one a float8 weight needs and the checkpoint lacks."""
    from tpcli.planning.quant import missing_scales, unplaceable_companions

    lost = unplaceable_companions(reader.unexpected, set(reader.key_file))
    if lost:
        more = f" (+{len(lost) - 1} more)" if len(lost) > 1 else ""
        raise CheckpointError(f"{where}: checkpoint key {lost[0]}{more} belongs to a weight the model keeps but has no "
                              "place in it (is config.json's quantization_config the one the checkpoint was saved "
                              "with?); refusing to drop it.")
    missing = missing_scales(reader.key_meta)
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: checkpoint key {missing[0]}{more} is missing: the float8 weight "
                              f"{missing[0].removesuffix('_scale_inv')} cannot be used without its scales; is the "
                              "checkpoint complete?")


def checkpoint_names(plan: ResolvedPlan) -> bool:
    """True when the model's run-time names are its checkpoint names: transformers has no conversion to revert
    (what `gather` checks before moving chunks as bytes), recorded in the manifest for `tpcli.formats.manifest_gather`."""
    from tpcli.planning.convert import Conversions

    return not Conversions(plan.model).reverts


def layout(plan: ResolvedPlan, reader, cast: str | None):
    """Dry-run every step. Returns the output tensors (state-dict order), per step the names it yields in order,
    and the tied copies the checkpoint stores once ({name read: [tied names written from it]})."""
    produced: dict[str, tuple[tuple[int, ...], str]] = {}
    steps: list[tuple[object, list[str]]] = []
    for step in reader.steps():
        names = []
        for name, shape, dtype in reader.preview(step):
            expected = plan.tensors.get(name)
            if expected is None:
                continue
            if tuple(shape) != expected.shape:
                raise CheckpointError(f"checkpoint tensor {name} has shape {list(shape)} but the config expects "
                                      f"{list(expected.shape)}; is config.json from the same model?")
            produced[name] = (shape, cast or dtype)
            names.append(name)
        steps.append((step, names))
    aliases: dict[str, list[str]] = {}
    for t in plan.tensors.values():  # tied copies that the checkpoint stores once
        if t.name not in produced and t.tied_to in produced:
            produced[t.name] = produced[t.tied_to]
            aliases.setdefault(t.tied_to, []).append(t.name)
    missing = [n for n in plan.tensors if n not in produced]
    if missing:
        raise CheckpointError(f"checkpoint has no tensor for {missing[0]}" +
                              (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "") +
                              "; is it complete and from the same model as config.json?")
    infos = [replace(t, dtype=produced[t.name][1]) for t in plan.tensors.values()]
    return infos, steps, aliases


def stored_as_is(reader, steps, kind: str, plan: ResolvedPlan, cast: str | None) -> dict | None:
    """{run-time name: (source file, absolute data offset, shape, dtype)} when every tensor written is a checkpoint
    tensor exactly as stored (at most renamed by transformers, no cast, not quantized), so that `tpcli.formats.bytecopy` can
    move its bytes; None otherwise (the tensors then go through transformers' converters)."""
    if kind != "checkpoint" or plan.quantization is not None or plan.dequantized:
        return None
    stored = {}
    for step, names in steps:
        (key, pattern), *more = step.sources
        if more or pattern is not None or names != [step.first_target]:  # a real conversion
            return None
        dtype, shape = reader.key_meta[key]
        if cast not in (None, dtype):
            return None
        f = reader.key_file[key]
        stored[step.first_target] = (f, reader.handle(f).offset(key), shape, dtype)
    return stored


@dataclass
class ShardJob(CachedJob):
    """Everything `shard` writes, decided before the first byte is read.

    `boxes` (rank -> one `bytecopy.Box` per entry, as JSON-ready lists) is set when every tensor is a checkpoint
    tensor as stored: the job is then plain data, cached by `tpcli.formats.cache` so that sharding the same checkpoint again
    needs neither torch nor transformers. Otherwise `live` holds the open reader for the general path."""

    rank_files: list  # (file name, [(name, dtype, sizes)], metadata) per rank
    doc: dict  # the manifest, "files" still empty
    summary: dict  # source, kind, tensors, unexpected_keys, quantization, warnings
    src_path: str
    cast: str | None
    dequantized: bool
    entries: int  # chunks written, for the free-space allowance
    total: int  # bytes read, for the progress bar
    boxes: list | None = None
    headers: dict | None = None  # source file -> (size, sha256 of its header): checked before a cached job runs
    live: tuple | None = None  # (reader, steps, tied_after, chunk_of, check_hashes)


def shard_checkpoint(model: str, *, tp: int, out: str, plan_file: str | None = None, dtype: str | None = None,
                     revision: str | None = None, force: bool = False, progress: Progress = no_progress,
                     byte_copy: bool = True, pp: int = 1) -> dict:
    """Write `out` with one file per rank plus tpcli.json; returns a summary dict.

    With pp > 1, pp x tp rank files (rank p x tp + t, transformers' mesh order): rank (p, t) holds only the tensors
    stage p holds on a `DistributedConfig(tp_size=tp, pp_size=pp)` load (`tpcli.planning.pipeline`), each cut as
    the TP plan cuts it for TP rank t (whole at tp 1); `tpcli.load_model` reads it on that mesh.

    byte_copy=False forces the general path (read, convert, slice, write) even where the bytes could be moved as
    they are (`tpcli.formats.bytecopy`); the two write identical files (tests compare them)."""
    from tpcli.formats import cache, cache_check

    cast = parse_dtype(dtype, "--dtype", allowed=CAST_DTYPES)
    local = Path(model).expanduser()
    out_path = prepare_output(out, force=force, inputs=[local] if local.exists() else [])
    removed = remove_stale_temps(out_path.parent)
    started = time.perf_counter()
    key = cache.key("shard", {"model": model, "tp": tp, "plan": plan_file, "dtype": cast,
                              "revision": revision}) if byte_copy and pp == 1 else None
    job = ShardJob.from_cache(cache.get(key), check=lambda e: cache_check.shard_entry(e, local.resolve(), tp)) \
        if key else None
    if job is None:
        reuse_freed_memory()
        job = plan_job(model, tp=tp, plan_file=plan_file, cast=cast, revision=revision, byte_copy=byte_copy, pp=pp)
        prepare_output(out, force=force, inputs=[Path(job.src_path)])  # a hub id is only known apart from OUT now
        if job.boxes is not None:
            cache.put(key, job.to_json())
    files, copied = _write_job(job, out_path, tp=tp, progress=progress, force=force)
    info = job.summary
    return {
        "out": str(out_path),
        "tp_size": tp,
        **({"pp_size": pp} if pp > 1 else {}),
        "source": info["source"],
        "kind": info["kind"],
        "tensors": info["tensors"],
        "files": files,
        "copied": copied,
        "bytes_written": sum(f["bytes"] for f in files.values()),
        "unexpected_keys": info["unexpected_keys"],
        "quantization": info["quantization"],
        "removed_temp_folders": removed,
        "warnings": info["warnings"],
        "seconds": round(time.perf_counter() - started, 3),
    }


def plan_job(model: str, *, tp: int, plan_file: str | None, cast: str | None, revision: str | None,
             byte_copy: bool = True, pp: int = 1) -> ShardJob:
    """Resolve the plan with transformers, check it, and lay out every rank file (nothing written yet)."""
    src, plan, reader, kind, check_hashes = open_source(model, plan_file=plan_file, revision=revision, cast=cast)
    try:
        findings = require_valid(plan, tp) + (pipeline.stage_findings(plan, pp) if pp > 1 else [])
        infos, steps, tied_after = layout(plan, reader, cast)
        chunks = plan_chunks(infos, tp, pipeline.stages(plan, pp) if pp > 1 else None)
        chunk_of = {(c.rank, c.name): c for rank in chunks for c in rank}
        order = [n for _, names in steps for name in names for n in [name, *tied_after.get(name, [])]]
        rank_files = []
        for r in range(tp * pp):
            entries = [(c.name, c.dtype, c.sizes) for n in order if (c := chunk_of.get((r, n))) is not None]
            rank_files.append((dcp.shard_file_name(r), entries, dcp.sharding_metadata(chunks[r])))
        doc = manifest.build(source={**src.describe(), "spec": model, "kind": kind}, tp=tp, plan=plan,
                             tensors=infos, chunks=chunks, dtype=cast, files={}, pp=pp)
        doc.update(quantization_record(plan, list(reader.unexpected)))
        if plan.quantization is None and not plan.dequantized:  # config_sha256 is added once config.json is written
            doc["names"] = {"checkpoint": checkpoint_names(plan)}
        job = ShardJob(rank_files=rank_files, doc=doc, src_path=str(src.path), cast=cast,
                       dequantized=plan.dequantized, entries=len(chunk_of),
                       total=sum(reader.step_bytes(s) for s, _ in steps),
                       summary={"source": doc["source"], "kind": kind, "tensors": len(infos),
                                "unexpected_keys": list(reader.unexpected), "quantization": doc["quantization"],
                                "warnings": [f.to_dict() for f in findings if f.severity == "warning"]})
        stored = stored_as_is(reader, steps, kind, plan, cast) if byte_copy else None
        if stored is None:
            job.live = (reader, steps, tied_after, chunk_of, check_hashes)
            return job
        origin = {alias: name for _, names in steps for name in names for alias in [name, *tied_after.get(name, [])]}
        job.boxes = [[[str(stored[origin[alias]][0]), stored[origin[alias]][1], list(stored[origin[alias]][2]),
                       list(chunk_of[(r, alias)].offsets), list(sizes), tensor_bytes(dt, (1,))]
                      for alias, dt, sizes in entries] for r, (_, entries, _) in enumerate(rank_files)]
        job.headers = {str(f): header_digest(f) for f in {v[0] for v in stored.values()}}
        reader.close()
        return job
    except BaseException:
        reader.close()
        raise


def _write_job(job: ShardJob, out_path: Path, *, tp: int, progress: Progress,
               force: bool = False) -> tuple[dict, list]:
    """Write the rank files, config and manifest into a temporary folder and publish it as `out_path`."""
    aux = sources.aux_files(Path(job.src_path))
    check_free_space(out_path, sum(file_size(e, m) for _, e, m in job.rank_files) +
                     sum(f.stat().st_size for f in aux) + metadata_allowance(job.entries))
    with atomic_dir(out_path, command="shard", force=force) as tmp:
        writers = []
        reader, steps, tied_after, chunk_of, check_hashes = job.live or (None, None, None, None, lambda: None)
        try:
            if job.boxes is not None:
                outputs = []
                for (name, entries, metadata), boxes in zip(job.rank_files, job.boxes, strict=True):
                    out_file, starts = bytecopy.lay_out(tmp / name, entries, metadata)
                    for (alias, _, _), (path, start, shape, offsets, sizes, itemsize) in zip(entries, boxes,
                                                                                                strict=True):
                        out_file.units.append([bytecopy.Box(Path(path), start, starts[alias], tuple(shape),
                                                            tuple(offsets), tuple(sizes), itemsize, box_in="src")])
                    outputs.append(out_file)
                with progress(job.total, _label(job, tp)) as bar:
                    hashes = bytecopy.write_files(outputs, sha256=True, advance=bar.advance)
                paths = [o.path for o in outputs]
            else:
                for name, entries, metadata in job.rank_files:
                    writers.append(StreamWriter(tmp / name, entries, metadata))
                hashes, paths = _stream(reader, steps, tied_after, chunk_of, writers, _label(job, tp), job.total,
                                        progress)
            check_hashes()  # a corrupt sharded input: raise before anything is published
        except BaseException:
            for w in writers:
                w.abort()
            raise
        finally:
            if reader is not None:
                reader.close()
        copied = copy_aux(Path(job.src_path), tmp, aux)
        if job.cast:
            set_config_dtype(tmp / "config.json", job.cast)
        if job.dequantized:
            strip_quantization_config(tmp / "config.json")
        files = {p.name: {"rank": r, "bytes": p.stat().st_size, "sha256": h}
                 for r, (p, h) in enumerate(zip(paths, hashes, strict=True))}
        doc = {**job.doc, "files": files}  # "files" keeps its place in the manifest
        if "names" in doc:
            sha = manifest_gather.config_sha256(tmp)
            if sha:
                doc["names"] = {**doc["names"], "config_sha256": sha}
            else:
                del doc["names"]
        manifest.write(tmp, doc)
    return files, copied


def _label(job: ShardJob, tp: int) -> str:
    pp = job.doc.get("pp_size", 1)
    return f"shard pp={pp} x tp={tp}" if pp > 1 else f"shard tp={tp}"


def _stream(reader, steps, tied_after, chunk_of, writers, label: str, total: int, progress: Progress):
    """The general path: read each step through transformers' converters, slice every rank's chunk, append it."""
    with progress(total, label) as bar:
        for step, names in steps:
            tensors, full = reader.read(step), None
            for name in names:
                full = tensors[name]
                for alias in [name, *tied_after.get(name, [])]:
                    for r in range(len(writers)):
                        c = chunk_of.get((r, alias))
                        if c is not None:
                            index = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=True))
                            writers[r].write(alias, cast_tensor(full[index], c.dtype))
            del tensors, full  # the loop variable would keep this step alive while the next is read
            bar.advance(reader.step_bytes(step))
    return [w.close() for w in writers], [w.path for w in writers]


def cast_tensor(t, dtype: str):
    import torch

    target = getattr(torch, dtype)
    return t if t.dtype == target else t.to(target)


def set_config_dtype(path: Path, dtype: str) -> None:
    if path.is_file():
        cfg = read_json(path, what="the model's config")
        cfg["dtype"] = dtype
        cfg.pop("torch_dtype", None)
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

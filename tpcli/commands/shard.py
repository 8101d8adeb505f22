"""`tpcli shard`: stream a checkpoint into per-rank files in transformers' pre-sharded (DCP) layout.

No process group and no model in RAM: every run-time tensor is read once (through transformers' converters),
cut into each rank's contiguous chunk, and appended to that rank's file. Peak memory is about one conversion
group (the largest fused tensor) plus its chunks. The same engine reshards a sharded folder N -> M.

open the source (`open_source`) -> plan (`plan_job`: a `tpcli.formats.byteplan.BytePlan`, one file per rank) ->
`tpcli.formats.executor.execute` -> report. Where every tensor is a checkpoint tensor as stored, each chunk is a
box of its bytes (cached, so a repeat needs neither torch nor transformers); otherwise `ShardStream` reads each
step through transformers' converters and the executor casts and appends every rank's chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from tpcli.commands import Progress, no_progress
from tpcli.errors import CheckpointError, UsageError
from tpcli.formats import dcp, manifest
from tpcli.formats import source as sources
from tpcli.formats.byteplan import BytePlan, FilePlan, Invalid, SourceBox, TensorPlan, header_digest
from tpcli.formats.executor import execute
from tpcli.formats.heap import reuse_freed_memory
from tpcli.formats.output import prepare_output, remove_stale_temps
from tpcli.formats.units import CAST_DTYPES, parse_dtype
from tpcli.planning import pipeline
from tpcli.planning.checks import require_valid
from tpcli.planning.layout import plan_chunks
from tpcli.planning.plan import ResolvedPlan, load_config, load_plan_file, resolve_plan
from tpcli.planning.quant import quantization_record
from tpcli.planning.readers import CheckpointReader, ShardedReader
from tpcli.runtime.folders import ShardedFolder


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
        # opened once: paths, sizes, headers, coverage; config.json's model (with --plan's user plan, else the
        # manifest's) through transformers, names and ties proven by the bytes
        folder = ShardedFolder.open(local, defer_hashes=True, with_plan=True, plan_file=plan_file)
        plan = folder.plan
        if plan.quantization is not None and cast:
            raise UsageError(f"--dtype with the quantized sharded folder {model}: dequantizing is done from the "
                             "original checkpoint; run `tpcli gather` first, then `tpcli shard --dtype` on its output.")
        reader = ShardedReader(local, tensors=folder.tensors)
        src = sources.Source(spec=model, path=local.resolve())
        return src, plan, reader, "sharded", folder.check_hashes
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


@dataclass(frozen=True)
class ShardJob:
    """What `shard` writes (`plan`, decided before the first byte is read) and reports (`summary`: source, kind,
    tensors, unexpected_keys, quantization, warnings). A plan of byte copies is plain data, cached by
    `tpcli.formats.cache` with its summary so that sharding the same checkpoint again needs neither torch nor
    transformers; otherwise `stream` reads the tensors through transformers' converters."""

    plan: BytePlan
    summary: dict
    stream: ShardStream | None = None
    check_inputs: Callable[[], None] = field(default=lambda: None)


class ShardStream:
    """The general path: read each step through transformers' converters and give every rank its chunk of each
    tensor, `full[offsets : offsets + sizes]` (the executor casts it to the planned dtype and appends it)."""

    def __init__(self, reader, steps, tied_after, chunk_of, files: list[str]):
        self.reader, self.steps, self.tied_after, self.chunk_of, self.files = reader, steps, tied_after, chunk_of, files

    def run(self, write, advance) -> None:
        for step, names in self.steps:
            tensors, full = self.reader.read(step), None
            for name in names:
                full = tensors[name]
                for alias in [name, *self.tied_after.get(name, [])]:
                    for r, file in enumerate(self.files):
                        c = self.chunk_of.get((r, alias))
                        if c is not None:
                            write(file, alias, full[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes,
                                                                                          strict=True))])
            del tensors, full  # the loop variable would keep this step alive while the next is read
            advance(self.reader.step_bytes(step))

    def close(self) -> None:
        self.reader.close()


def shard_checkpoint(model: str, *, tp: int, out: str, plan_file: str | None = None, dtype: str | None = None,
                     revision: str | None = None, force: bool = False, progress: Progress = no_progress,
                     byte_copy: bool = True, pp: int = 1) -> dict:
    """Write `out` with one file per rank plus tpcli.json; returns a summary dict.

    With pp > 1, pp x tp rank files (rank p x tp + t, transformers' mesh order): rank (p, t) holds only the tensors
    stage p holds on a `DistributedConfig(tp_size=tp, pp_size=pp)` load (`tpcli.planning.pipeline`), each cut as
    the TP plan cuts it for TP rank t (whole at tp 1); `tpcli.load_model` reads it on that mesh.

    byte_copy=False forces the general path (read, convert, slice, write) even where the bytes could be moved as
    they are (`tpcli.formats.bytecopy`); the two write identical files (tests compare them)."""
    from tpcli.formats import cache

    cast = parse_dtype(dtype, "--dtype", allowed=CAST_DTYPES)
    local = Path(model).expanduser()
    out_path = prepare_output(out, force=force, inputs=[local] if local.exists() else [])
    removed = remove_stale_temps(out_path.parent)
    started = time.perf_counter()
    key = cache.key("shard", {"model": model, "tp": tp, "plan": plan_file, "dtype": cast,
                              "revision": revision}) if byte_copy and pp == 1 else None
    job = cached_job(cache.get(key), local.resolve(), tp) if key else None
    if job is None:
        reuse_freed_memory()
        job = plan_job(model, tp=tp, plan_file=plan_file, cast=cast, revision=revision, byte_copy=byte_copy, pp=pp)
        prepare_output(out, force=force, inputs=[Path(job.plan.source)])  # a hub id is only known apart from OUT now
        if job.stream is None:
            cache.put(key, {"plan": job.plan.to_json(), "summary": job.summary})
    written = execute(job.plan, out_path, force=force, progress=progress, sha256=True, check_inputs=job.check_inputs,
                      stream=job.stream)
    files = {name: {"rank": r, "bytes": size, "sha256": h} for r, (name, (size, h)) in enumerate(written.files.items())}
    info = job.summary
    return {
        "out": str(out_path),
        "tp_size": tp,
        **({"pp_size": pp} if pp > 1 else {}),
        "source": info["source"],
        "kind": info["kind"],
        "tensors": info["tensors"],
        "files": files,
        "copied": written.copied,
        "bytes_written": sum(f["bytes"] for f in files.values()),
        "unexpected_keys": info["unexpected_keys"],
        "quantization": info["quantization"],
        "removed_temp_folders": removed,
        "warnings": info["warnings"],
        "seconds": round(time.perf_counter() - started, 3),
    }


def cached_job(entry: dict | None, folder: Path, tp: int) -> ShardJob | None:
    """The cached job of the model folder `folder` (resolved) at `tp`, if its plan passes `BytePlan.from_json`'s
    validation (sources unchanged since planning) and writes exactly the `tp` rank files; else None (replan)."""
    from tpcli.formats.cache_check import shard_summary

    if not isinstance(entry, dict) or set(entry) != {"plan", "summary"}:
        return None
    try:
        plan = BytePlan.from_json(entry["plan"], source=folder, aux_folder=folder, command="shard")
        shard_summary(entry["summary"])
    except Invalid:
        return None
    if [f.name for f in plan.files] != [dcp.shard_file_name(r) for r in range(tp)]:
        return None
    return ShardJob(plan, entry["summary"])


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
        doc = manifest.build(source={**src.describe(), "spec": model, "kind": kind}, tp=tp, plan=plan,
                             tensors=infos, chunks=chunks, dtype=cast, files={}, pp=pp)
        doc.update(quantization_record(plan, list(reader.unexpected)))
        if plan.quantization is None and not plan.dequantized:  # config_sha256 is added once config.json is written
            doc["names"] = {"checkpoint": checkpoint_names(plan)}
        summary = {"source": doc["source"], "kind": kind, "tensors": len(infos),
                   "unexpected_keys": list(reader.unexpected), "quantization": doc["quantization"],
                   "warnings": [f.to_dict() for f in findings if f.severity == "warning"]}
        stored = stored_as_is(reader, steps, kind, plan, cast) if byte_copy else None
        origin = {alias: name for _, names in steps for name in names for alias in [name, *tied_after.get(name, [])]}

        def tensor(c) -> TensorPlan:
            """Rank c.rank's chunk of c.name: streamed, or the box of its stored bytes."""
            if stored is None:
                return TensorPlan(c.name, c.dtype, tuple(c.sizes))
            path, start, shape, _ = stored[origin[c.name]]
            return TensorPlan(c.name, c.dtype, tuple(c.sizes), (
                SourceBox(Path(path).name, start, tuple(shape), tuple(c.offsets), tuple(c.sizes), "src"),))

        files = tuple(FilePlan(dcp.shard_file_name(r), tuple(tensor(chunk_of[r, n]) for n in order if (r, n) in chunk_of),
                               dcp.sharding_metadata(chunks[r])) for r in range(tp * pp))
        label = f"shard pp={pp} x tp={tp}" if pp > 1 else f"shard tp={tp}"
        byte_plan = BytePlan(
            command="shard", label=label, source=str(src.path), files=files,
            total=sum(reader.step_bytes(s) for s, _ in steps), aux_folder=str(src.path),
            aux=tuple(p.name for p in sources.aux_files(src.path)), config_dtype=cast,
            strip_quantization=plan.dequantized, manifest=doc,
            headers={Path(f).name: header_digest(f) for f in {v[0] for v in stored.values()}} if stored else {})
        if stored is None:
            return ShardJob(byte_plan, summary, ShardStream(reader, steps, tied_after, chunk_of,
                                                            [f.name for f in files]), check_hashes)
        reader.close()
        return ShardJob(byte_plan, summary)
    except BaseException:
        reader.close()
        raise



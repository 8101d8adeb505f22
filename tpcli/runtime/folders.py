"""A checked folder: `ShardedFolder` (a tpcli folder or a transformers DCP save) and `StateFolder` (a
`tpcli.save_state` folder), each opened ONCE and then passed along.

`ShardedFolder.open(path, ...)` proves, before anything is planned or read from the folder:

* every path is inside the folder: tpcli.json and the rank files are regular files resolving inside it
  (`formats.source.check_inside`), and the manifest names only plain files (`formats.manifest.read`);
* every listed rank file is present at its recorded size, no unlisted rank file lies beside them, and (unless
  `quick`) each file's sha256 is the manifest's, now or, with `defer_hashes`, by `folder.check_hashes()` before a
  caller publishes what it wrote;
* every range is inside its file: the safetensors headers (`formats.tensor_file`), each tensor's chunks tiling its
  global box (`dcp.check_coverage`), and the manifest's shapes, dtypes and chunks equal to the headers';
* names and ties are config.json's model, proven from the bytes (`check_names`): with `with_plan` through
  transformers now (`folder.plan`), or against `record` (`model_record`, transformers' earlier verdict, cached).

`verify DIR`, `gather`, `shard DIR` (reshard), `run`'s preflight, `planning.saved_mesh.saved_by` and `load_model`'s
routing all take the object: none of them reads tpcli.json again. A training state seen as a sharded folder
(gather, run's preflight) carries its `StateFolder` as `folder.state`.

`StateFolder.open(path, ...)`: tpcli-state.json's schema, every listed file present at its size (no unlisted weight
or optimizer file), sha256 (unless `quick`), the rank files' tensors equal to the manifest's model signature, and
(with `optimizer`) the optimizer metadata's byte ranges inside the listed files and its tensors tiling the saved
parameters. `verify STATE`, `gather STATE`, `run`'s preflight and `load_state` share it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tpcli.errors import CheckpointError
from tpcli.formats import dcp, manifest
from tpcli.formats import state_manifest as sm
from tpcli.formats.hashing import sha256_files
from tpcli.formats.source import check_inside


def _no_check() -> None:
    return None


@dataclass(frozen=True)
class StateFolder:
    """A `save_state` folder, checked. `doc`: its tpcli-state.json; `tensors`: the saved model's tensors (name ->
    `dcp.ShardedTensor`, chunks tiling each global shape); `optimizer`: the optimizer's coverage of the model
    (`optimizer_coverage`), None when not checked; `hashes_checked`: every checked file's sha256 was compared."""

    path: Path
    doc: dict
    tensors: dict
    hashes_checked: bool
    optimizer: dict | None = None

    @property
    def mesh(self) -> dict:
        """The mesh it was saved on: {"tp", "fsdp", "dp_replicate", "ep"}."""
        return self.doc["mesh"]

    @classmethod
    def open(cls, path: Path, *, quick: bool = False, optimizer: bool = True) -> StateFolder:
        """Raise CheckpointError at the first problem. `optimizer=False` (gather, run's preflight) hashes and checks
        only the model's files; `quick` compares sizes, not hashes."""
        folder = Path(path)
        doc = sm.read(folder)
        sm.check_sizes(folder, doc)
        names = [n for n in sorted(doc["files"]) if optimizer or not n.startswith(sm.OPTIMIZER_DIR + "/")]
        if not quick:
            sm.check_hashes(folder, doc, names, sha256_files([folder / n for n in names]))
        tensors = dcp.scan(folder)
        entries = [(name, t.shape, t.dtype) for name, t in tensors.items()]
        if len(entries) != doc["model"]["tensors"] or sm.signature(entries) != doc["model"]["signature"]:
            raise CheckpointError(f"{folder / sm.NAME}: the model signature differs from the tensors the rank files "
                                  f"hold ({len(entries)} tensors, the manifest says {doc['model']['tensors']}); the "
                                  "folder mixes files of different saves.")
        coverage = optimizer_coverage(folder, doc, tensors) if optimizer else None
        return cls(path=folder, doc=doc, tensors=tensors, hashes_checked=not quick, optimizer=coverage)


@dataclass(frozen=True)
class ShardedFolder:
    """A sharded folder, checked (see the module's docstring).

    kind: "tpcli" (tpcli.json), "tpcli-state" (a training state: `state`) or "transformers-dcp" (neither);
    manifest: tpcli.json's document, None without one; tp_size: the manifest's, else the number of rank files;
    tensors: name -> `dcp.ShardedTensor` (global shape, dtype, chunks: file, rank, offsets, sizes);
    files: the rank files' names, sorted; plan: config.json's `ResolvedPlan` (`with_plan`), else None;
    record: what the rank files were checked against (`record_of(plan)` or the caller's `model_record`), None when
    names were not checked."""

    path: Path
    kind: str
    manifest: dict | None
    tp_size: int
    tensors: dict
    files: list
    plan: Any = None
    record: dict | None = None
    state: StateFolder | None = None
    _hashes: Callable[[], None] = field(default=_no_check, repr=False, compare=False)

    def check_hashes(self) -> None:
        """Wait for the deferred sha256 of the rank files (`open(defer_hashes=True)`); raise on a mismatch. A no-op
        where hashes were checked in `open`, or not at all (`quick`, or no manifest recording them)."""
        self._hashes()

    @classmethod
    def open(cls, path: Path, *, quick: bool = False, with_plan: bool = False, defer_hashes: bool = False,
             record: dict | None = None, plan_file: str | None = None) -> ShardedFolder:
        """Check `path` (see the module's docstring) and return it; raises `CheckpointError` at the first problem,
        naming the file and what is wrong.

        The rank files are compared with config.json's model: with `with_plan` through transformers now (the plan,
        with the manifest's user plan, or `plan_file`'s where given, is kept as `plan`), or against `record`
        (`model_record`: the same comparison, from transformers' earlier verdict). With `defer_hashes`, the sha256
        of the files runs on a helper thread and `check_hashes()` waits for it: a caller writing into a temporary
        folder calls it before publishing its output. A training state (tpcli-state.json) is opened as a
        `StateFolder` first (model files only; hashed now unless `quick`)."""
        folder = Path(path)
        state = StateFolder.open(folder, quick=quick, optimizer=False) if sm.is_state_dir(folder) else None
        meta = manifest.read(folder)
        shard_paths = dcp.shard_files(folder)
        for p in shard_paths:  # a FIFO or device would block the hashing and reading below; a link may point anywhere
            check_inside(folder, p, "rank files")
        present = {p.name for p in shard_paths}
        if meta:
            _check_listed(folder, meta, present)
        hashes = _hash_check(folder, meta) if meta and not quick else _no_check
        if not defer_hashes:
            hashes()
        tensors = state.tensors if state is not None else dcp.scan(folder, expected_files=list(meta["files"]) if meta
                                                                   else None)
        if meta:
            _compare_manifest(folder, meta, tensors)
        kind = "tpcli" if meta else "tpcli-state" if state is not None else "transformers-dcp"
        opened = cls(path=folder, kind=kind, manifest=meta, tp_size=meta["tp_size"] if meta else len(present),
                     tensors=tensors, files=sorted(present), state=state, _hashes=hashes)
        if with_plan:
            return opened.with_plan(plan_file=plan_file)
        return opened.with_record(record) if record is not None else opened

    def with_plan(self, *, plan_file: str | None = None) -> ShardedFolder:
        """This folder with its names proven against config.json's model, planned through transformers now: its
        `plan` (the manifest's user plan, or `plan_file`'s) and `record_of(plan)` set."""
        plan = _config_plan(self.path, self.manifest, plan_file)
        return replace(self.with_record(record_of(plan)), plan=plan)

    def with_record(self, record: dict) -> ShardedFolder:
        """This folder with its names proven against `record` (`record_of` a plan, or `model_record`): names,
        shapes, the plan's cuts and the ties, from the bytes (`check_names`)."""
        check_names(self.path, self.manifest, self.tensors, record)
        return replace(self, record=record)


def _check_listed(folder: Path, meta: dict, present: set) -> None:
    """Every rank file the manifest lists is present at its recorded size; none is present that it does not list."""
    listed = set(meta["files"])
    for name in sorted(listed):
        path = folder / name
        if name not in present:
            raise CheckpointError(f"{path}: missing (rank {meta['files'][name].get('rank')} of {meta['tp_size']}).")
        size = path.stat().st_size
        if size != meta["files"][name]["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest records {meta['files'][name]['bytes']} "
                                  "(truncated or replaced).")
    extra = sorted(present - listed)
    if extra:
        raise CheckpointError(f"{folder / extra[0]}: not listed in {manifest.NAME}; remove it or re-shard.")


def _hash_check(folder: Path, meta: dict):
    """Start hashing every listed file in the background; returns a callable that waits and raises on a mismatch."""
    from concurrent.futures import ThreadPoolExecutor

    names = sorted(meta["files"])
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(sha256_files, [folder / n for n in names])
    pool.shutdown(wait=False)

    def check() -> None:
        for name, digest in zip(names, future.result(), strict=True):
            if digest != meta["files"][name]["sha256"]:
                raise CheckpointError(f"{folder / name}: sha256 {digest} does not match the manifest "
                                      f"({meta['files'][name]['sha256']}); the file is corrupt.")

    return check


def _compare_manifest(folder: Path, meta: dict, tensors: dict) -> None:
    where = folder / manifest.NAME
    recorded = meta["tensors"]
    missing = sorted(set(recorded) - set(tensors))
    if missing:
        raise CheckpointError(f"{where}: lists {missing[0]}, which no shard file holds.")
    unlisted = sorted(set(tensors) - set(recorded))
    if unlisted:
        raise CheckpointError(f"{where}: does not list {unlisted[0]}, which a shard file holds.")
    for name, t in tensors.items():
        rec = recorded[name]
        if list(t.shape) != list(rec["shape"]) or t.dtype != rec["dtype"]:
            raise CheckpointError(f"{where}: {name} is recorded as {rec['dtype']} {rec['shape']} but stored as "
                                  f"{t.dtype} {list(t.shape)}; the manifest was edited.")
        stored = sorted((c.file, list(c.offsets), list(c.sizes)) for c in t.chunks)
        listed = sorted((c["file"], c["offsets"], c["sizes"]) for c in rec["chunks"])
        if stored != listed:
            raise CheckpointError(f"{where}: chunks of {name} differ from the shard files; the manifest was edited.")


def _config_plan(folder: Path, meta: dict | None, plan_file: str | None = None):
    """config.json's plan through transformers, with `plan_file`'s user plan (a reshard's --plan) or else the
    manifest's."""
    from tpcli.planning.plan import load_config, load_plan_file, resolve_plan

    user_plan = load_plan_file(plan_file) if plan_file else manifest.user_plan(meta)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder / 'config.json'}: missing; a sharded folder needs the model's config.")
    return resolve_plan(load_config(folder), user_plan=user_plan, plan_file=plan_file)


def record_of(plan) -> dict:
    """What config.json's model is, per transformers' plan: {"architecture", "tensors": {name: {"shape",
    "tied_to", "cut"}}, "quantized"} (JSON-ready: `model_record` caches it); "cut" is the dim the plan shards the
    tensor along (a rank file holds the contiguous chunk of it: `_StridedShard` is saved as `Shard`), None when
    replicated."""
    return {"architecture": plan.architecture,
            "tensors": {n: {"shape": list(t.shape), "tied_to": t.tied_to,
                            "cut": t.placement.dim if t.placement.is_sharded else None}
                        for n, t in plan.tensors.items()},
            "quantized": plan.quantization is not None or bool(plan.dequantized)}


def model_record(folder: Path, meta: dict | None) -> dict:
    """`record_of` the plan of `folder`'s config.json, plus "checkpoint": transformers has no conversion to revert
    (the run-time names are the checkpoint names).

    This is what the manifest path (`tpcli.formats.manifest_gather`) checks the rank files against and plans from,
    instead of the manifest's own `names` record, which whoever edits the folder can rewrite. Computing it builds
    the meta model (torch, transformers); the result is kept in tpcli's private cache (`tpcli.formats.cache`), keyed
    by the folder's files (config.json's bytes included), so a later gather or verify of the same folder imports
    neither."""
    from tpcli.formats import cache
    from tpcli.formats.cache_check import model_record_entry

    key = cache.key("model-record", {"target": str(folder), "user_plan": json.dumps(manifest.user_plan(meta),
                                                                                     sort_keys=True)}, sharded=True)
    hit = cache.get(key)
    if hit is not None and model_record_entry(hit):
        return hit
    from tpcli.planning.convert import Conversions

    plan = _config_plan(folder, meta)
    return cache.put(key, {**record_of(plan), "checkpoint": not Conversions(plan.model).reverts})


def check_names(folder: Path, meta: dict | None, tensors: dict, record: dict) -> None:
    """The rank files hold exactly the tensors of config.json's model (`record`): no name it lacks, every name it
    needs at its shape, and a tensor left out only where config.json ties it AND the bytes agree (its twin present
    at its shape and dtype; where the files also hold the tied copy, byte for byte the twin's). The manifest's ties
    must be config.json's: a tie recorded there alone would make `gather` drop a tensor the files hold."""
    expected, arch = record["tensors"], record["architecture"]
    for name, t in tensors.items():
        want = expected.get(name)
        if want is None:
            raise CheckpointError(f"{folder}: shards hold {name}, which {arch} (config.json) does not have.")
        if list(t.shape) != list(want["shape"]):
            raise CheckpointError(f"{folder}: the shards cover {name} as {list(t.shape)} but config.json needs "
                                  f"{list(want['shape'])}; a rank file is missing, or config.json is another model's.")
    if meta is not None:  # a tpcli folder: the fast load path reads it by the plan. A transformers DCP save (no
        # manifest: a state folder, save_pretrained on any mesh) is read by its saved offsets, whatever the mesh was.
        _check_cuts(folder, meta, tensors, expected)
    absent = [n for n, t in expected.items() if n not in tensors and not (t["tied_to"] and t["tied_to"] in tensors)]
    if absent:
        raise CheckpointError(f"{folder}: no shard holds {absent[0]}, which config.json's model needs.")
    for name, want in expected.items():
        twin = want["tied_to"]
        if twin is None or name not in tensors:
            continue
        a, b = tensors[name], tensors[twin]
        if (a.dtype, list(a.shape)) != (b.dtype, list(b.shape)) or not same_values(folder, a, b):
            raise CheckpointError(f"{folder}: config.json ties {name} to {twin}, but the shards hold different "
                                  f"values for them; config.json does not describe these weights (was it edited?).")
    if meta is not None:
        for name, rec in meta["tensors"].items():
            want = expected.get(name, {}).get("tied_to")
            if rec["tied_to"] != want:
                raise CheckpointError(f"{folder / manifest.NAME}: records {name} as tied to {rec['tied_to']!r}, but "
                                      f"config.json's {arch} {f'ties it to {want!r}' if want else 'does not tie it'}; "
                                      "the manifest was edited.")


def _check_cuts(folder: Path, meta: dict, tensors: dict, expected: dict) -> None:
    """Every tensor is cut as the plan (config.json's, with the manifest's user plan) places it: rank r's file holds
    `contiguous_chunk` r along the record's "cut" dim, a replicated tensor is whole. The fast load path
    (`tpcli.load_model`) reads each rank's slice by the plan, so a plan edited in tpcli.json (q_proj 'rowwise' over
    files cut 'colwise') would load a model that computes something else while every byte checks out."""
    import math

    tp = meta["tp_size"]
    for name, t in tensors.items():
        cut, shape = expected[name]["cut"], tuple(t.shape)
        if tp == 1:  # nothing is cut; a pp folder (`shard --tp 1 --pp P`) holds each tensor whole in its stage's file
            cut = None
        # a pp x tp folder: rank p x tp + t holds TP chunk t of its stage's tensors (a chunk two stages hold, once)
        if cut is None:
            want = {(-1, (0,) * len(shape), shape)}
        else:  # DTensor's Shard split (torch.chunk): pieces of ceil(N / tp), the trailing ranks short or empty
            n = shape[cut]
            step = -(-n // tp)
            want = set()
            for r in range(tp):
                start, stop = min(r * step, n), min((r + 1) * step, n)
                want.add((r, tuple(start if d == cut else 0 for d in range(len(shape))),
                          tuple(stop - start if d == cut else s for d, s in enumerate(shape))))
        want = {w for w in want if math.prod(w[2])}
        have = {(c.rank % tp if cut is not None else -1, tuple(c.offsets), tuple(c.sizes)) for c in t.chunks
                if math.prod(c.sizes)}
        if have != want:
            how = "whole (replicated)" if cut is None else f"along dim {cut} over {tp} ranks"
            raise CheckpointError(f"{folder}: the shards cut {name} otherwise than the plan places it ({how}); the "
                                  f"plan in {manifest.NAME} or config.json was edited, or the files are another "
                                  "plan's: re-shard.")


def same_values(folder: Path, a, b) -> bool:
    """Tensors `a` and `b` (`dcp.ShardedTensor`, same dtype and shape) hold the same bytes: chunk by chunk where
    both are cut the same way (no torch), else assembled whole."""
    same = dcp.same_chunk_bytes(folder, a, b)
    if same is not None:
        return same
    import torch

    from tpcli.planning.readers import ShardedReader

    reader = ShardedReader(folder, tensors={a.name: a, b.name: b})
    try:
        full = reader.read([a.name, b.name])
        return torch.equal(full[a.name].reshape(-1).view(torch.uint8), full[b.name].reshape(-1).view(torch.uint8))
    finally:
        reader.close()


def optimizer_coverage(folder: Path, doc: dict, tensors: dict) -> dict:
    """Per parameter, which state tensors the optimizer files hold (each tiled by its chunks, each of the
    parameter's global shape unless it is a scalar like `step`), and that they agree with the manifest."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from tpcli.formats.dcp_metadata import (
        check_storage,
        check_tiles,
        metadata_limit,
        optimizer_state_entries,
        optimizer_summary,
        read_metadata,
    )

    where = folder / sm.OPTIMIZER_DIR
    meta = read_metadata(where, limit=metadata_limit(doc))
    check_storage(where, doc, meta)
    per_param = optimizer_state_entries(meta)
    for param, entries in per_param.items():
        t = tensors.get(param)
        if t is None:
            raise CheckpointError(f"{where}: holds optimizer state {next(iter(entries))} for {param}, which the saved "
                                  "model does not have; the folder mixes files of different saves.")
        for state_key, m in entries.items():
            if not isinstance(m, TensorStorageMetadata):
                continue
            if len(m.size) and tuple(m.size) != tuple(t.shape):
                raise CheckpointError(f"{where}: optimizer tensor {param}.{state_key} is {list(m.size)}, the "
                                      f"parameter is {list(t.shape)}.")
            check_tiles(where, f"{param}.{state_key}", m)
    summary = optimizer_summary(meta)
    if summary["tensors"] != doc["optimizer"]["tensors"]:
        raise CheckpointError(f"{where}: holds {summary['tensors']} optimizer tensors, {sm.NAME} says "
                              f"{doc['optimizer']['tensors']}.")
    return {"class": doc["optimizer"]["class"], **summary,
            "parameters_with_state": len(per_param), "parameters": len(tensors),
            "without_state": sorted(set(tensors) - set(per_param))}

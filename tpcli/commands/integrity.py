"""Integrity of a sharded folder: manifest, files, hashes, coverage, and agreement with config.json.

`check_folder` raises `CheckpointError` at the first problem, naming the file and what is wrong; `gather`, `run`'s
preflight and `verify SHARDED_DIR` all go through it.
"""

from __future__ import annotations

from pathlib import Path

from tpcli.errors import CheckpointError
from tpcli.formats import dcp, manifest
from tpcli.formats.hashing import sha256_files
from tpcli.formats.source import check_inside


def check_folder(folder: Path, *, quick: bool = False, with_plan: bool = False, defer_hashes: bool = False) -> dict:
    """Check `folder`; returns {"manifest", "tp_size", "tensors", "files", "plan"?, "check_hashes"}.

    With `defer_hashes`, the sha256 of the files runs on helper threads and `result["check_hashes"]()` waits for
    it and raises on a mismatch: a caller writing into a temporary folder calls it before publishing its output.
    """
    folder = Path(folder)
    meta = manifest.read(folder)
    shard_paths = dcp.shard_files(folder)
    for p in shard_paths:  # a FIFO or device would block the hashing and reading below; a link may point anywhere
        check_inside(folder, p, "rank files")
    present = {p.name for p in shard_paths}
    if meta:
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
    check_hashes = _hash_check(folder, meta) if meta and not quick else (lambda: None)
    if not defer_hashes:
        check_hashes()
    tensors = dcp.scan(folder, expected_files=list(meta["files"]) if meta else None)
    if meta:
        _compare_manifest(folder, meta, tensors)
        tp = meta["tp_size"]
    else:
        tp = len(present)
    result = {"manifest": meta, "tp_size": tp, "tensors": tensors, "files": sorted(present),
              "check_hashes": check_hashes}
    if with_plan:
        result["plan"] = _check_config(folder, meta, tensors)
    return result


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


def _check_config(folder: Path, meta: dict | None, tensors: dict):
    from tpcli.planning.plan import load_config, resolve_plan

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder / 'config.json'}: missing; a sharded folder needs the model's config.")
    plan = resolve_plan(load_config(folder), user_plan=manifest.user_plan(meta))
    for name, t in tensors.items():
        expected = plan.tensors.get(name)
        if expected is None:
            raise CheckpointError(f"{folder}: shards hold {name}, which {plan.architecture} (config.json) does not have.")
        if tuple(t.shape) != expected.shape:
            raise CheckpointError(f"{folder}: the shards cover {name} as {list(t.shape)} but config.json needs "
                                  f"{list(expected.shape)}; a rank file is missing, or config.json is another model's.")
    absent = [n for n, t in plan.tensors.items() if n not in tensors and not (t.tied_to and t.tied_to in tensors)]
    if absent:
        raise CheckpointError(f"{folder}: no shard holds {absent[0]}, which config.json's model needs.")
    return plan

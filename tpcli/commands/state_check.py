"""`tpcli verify STATE` and `tpcli gather STATE`: a training-state folder (`tpcli.save_state`) checked offline.

verify: the manifest, every file's size and sha256, the parameters' chunks tiling each tensor (as for any
transformers DCP save) and matching the manifest's model signature, and the optimizer state covering the model:
every saved optimizer tensor is tiled by its chunks and belongs to a saved parameter; parameters without state
are reported (a frozen parameter has none; a trainable one without state was not stepped).
gather: the model only, from the same files; the optimizer state is left out, and the report says so.
"""

from __future__ import annotations

from pathlib import Path

from tpcli.errors import CheckpointError
from tpcli.formats import dcp
from tpcli.formats import state_manifest as sm
from tpcli.formats.hashing import sha256_files


def check_state(folder: Path, *, quick: bool = False, optimizer: bool = True) -> dict:
    """Raise CheckpointError at the first problem; returns {"doc", "tensors", "optimizer"?, "hashes_checked"}.
    `optimizer=False` (gather) hashes and checks only the model's files."""
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
    result = {"doc": doc, "tensors": tensors, "hashes_checked": not quick}
    if optimizer:
        result["optimizer"] = _optimizer_coverage(folder, doc, tensors)
    return result


def _optimizer_coverage(folder: Path, doc: dict, tensors: dict) -> dict:
    """Per parameter, which state tensors the optimizer files hold (each tiled by its chunks, each of the
    parameter's global shape unless it is a scalar like `step`), and that they agree with the manifest."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from tpcli.formats.dcp_metadata import check_storage, metadata_limit, read_metadata
    from tpcli.runtime.state import check_tiles, optimizer_state_entries, optimizer_summary

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


def verify_state(folder: Path, *, quick: bool = False) -> dict:
    """`tpcli verify STATE`: the JSON-ready result (mode "state")."""
    from tpcli.planning.checks import Finding

    findings = []
    info = None
    try:
        info = check_state(folder, quick=quick)
    except CheckpointError as exc:
        findings.append(Finding("error", "integrity", str(exc)))
    result = {"mode": "state", "target": str(folder), "findings": [], "ok": info is not None}
    if info is not None:
        doc, opt = info["doc"], info["optimizer"]
        if opt["without_state"]:
            findings.append(Finding("warning", "optimizer-coverage",
                                    f"{len(opt['without_state'])} of {opt['parameters']} parameters have no optimizer "
                                    f"state (frozen, or never stepped), e.g. {opt['without_state'][0]}"))
        result.update(step=doc["step"], mesh=doc["mesh"], mesh_text=sm.mesh_text(doc["mesh"]),
                      tensors=len(info["tensors"]), hashes_checked=info["hashes_checked"],
                      files=len(doc["files"]), optimizer={k: v for k, v in opt.items() if k != "without_state"})
    result["findings"] = [f.to_dict() for f in findings]
    result["ok"] = info is not None
    return result

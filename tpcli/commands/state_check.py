"""`tpcli verify STATE` and `tpcli gather STATE`: a training-state folder (`tpcli.save_state`) checked offline
(`tpcli.runtime.folders.StateFolder`).

verify: the manifest, every file's size and sha256, the parameters' chunks tiling each tensor (as for any
transformers DCP save) and matching the manifest's model signature, and the optimizer state covering the model:
every saved optimizer tensor is tiled by its chunks and belongs to a saved parameter; parameters without state
are reported (a frozen parameter has none; a trainable one without state was not stepped).
gather: the model only, from the same files; the optimizer state is left out, and the report says so.
"""

from __future__ import annotations

from pathlib import Path

from tpcli.errors import CheckpointError
from tpcli.formats import state_manifest as sm
from tpcli.runtime.folders import StateFolder


def verify_state(folder: Path, *, quick: bool = False) -> dict:
    """`tpcli verify STATE`: the JSON-ready result (mode "state")."""
    from tpcli.planning.checks import Finding

    findings = []
    info = None
    try:
        info = StateFolder.open(folder, quick=quick)
    except CheckpointError as exc:
        findings.append(Finding("error", "integrity", str(exc)))
    result = {"mode": "state", "target": str(folder), "findings": [], "ok": info is not None}
    if info is not None:
        doc, opt = info.doc, info.optimizer
        if opt["without_state"]:
            findings.append(Finding("warning", "optimizer-coverage",
                                    f"{len(opt['without_state'])} of {opt['parameters']} parameters have no optimizer "
                                    f"state (frozen, or never stepped), e.g. {opt['without_state'][0]}"))
        result.update(step=doc["step"], mesh=doc["mesh"], mesh_text=sm.mesh_text(doc["mesh"]),
                      tensors=len(info.tensors), hashes_checked=info.hashes_checked,
                      files=len(doc["files"]), optimizer={k: v for k, v in opt.items() if k != "without_state"})
    result["findings"] = [f.to_dict() for f in findings]
    result["ok"] = info is not None
    return result

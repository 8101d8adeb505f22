"""Worker for `tpcli run --cpu W --tp T --fsdp F [--dp-replicate R] [--ep E] [--pp P] mesh_load_worker.py MODEL OUT`.

On every rank: `tpcli.load_model()` (the mesh from TPCLI_MESH), then transformers' own
`from_pretrained(MODEL, distributed_config=DistributedConfig(tp_size=T, fsdp_size=F, dp_replicate_size=R,
ep_size=E))` (the oracle), and the plain single-process model (the numerics oracle). Rank r writes OUT/rank{r}.json:
  * future_warnings: the FutureWarnings raised inside `tpcli.load_model` (must be none);
  * env_mesh / device_mesh_theirs / device_mesh_ours: TPCLI_MESH and both models' `_device_mesh` (names, shape);
  * mismatch: parameters whose placements, local shape or local values differ from transformers' own load;
  * logits_max_abs: max |logits(load_model) - logits(single process)| on a fixed batch (fp32);
  * info_env / info_model: `tpcli.mesh_info()` from the environment and from the model (must agree).
"""

import json
import os
import sys
import warnings
from pathlib import Path

import torch
from worker_common import param_mismatches  # noqa: E402  (this script's folder is on sys.path)

import tpcli

model_dir, out = sys.argv[1], Path(sys.argv[2])
IDS = torch.tensor([[1, 17, 256, 3, 999, 42, 7, 512], [1, 5, 6, 7, 8, 900, 13, 21]])

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ours = tpcli.load_model(model_dir)
future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402

info = tpcli.mesh_info()
m = info.mesh
theirs = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=DistributedConfig(
    tp_size=m.tp, fsdp_size=m.fsdp, dp_replicate_size=m.dp_replicate, ep_size=m.ep, pp_size=m.pp))
single = AutoModelForCausalLM.from_pretrained(model_dir)


def describe(mesh):
    return {"names": list(mesh.mesh_dim_names), "shape": list(mesh.mesh.shape)}


mismatch = param_mismatches(ours, theirs)
theirs_params = dict(theirs.named_parameters())

with torch.no_grad():
    logits = ours(IDS).logits
    logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
    ref = single(IDS).logits
rank = torch.distributed.get_rank()
out.mkdir(parents=True, exist_ok=True)
(out / f"rank{rank}.json").write_text(json.dumps({
    "future_warnings": future,
    "env_mesh": os.environ.get("TPCLI_MESH"),
    "device_mesh_ours": describe(ours._device_mesh),
    "device_mesh_theirs": describe(theirs._device_mesh),
    "mismatch": mismatch,
    "n_params": len(theirs_params),
    "placements": sorted({repr(getattr(p, "placements", None)) for p in theirs_params.values()}),
    "logits_max_abs": (logits - ref).abs().max().item(),
    "info_env": info.to_dict(),
    "info_model": tpcli.mesh_info(ours).to_dict(),
}))

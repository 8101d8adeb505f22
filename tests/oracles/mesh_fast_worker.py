"""Worker for `tpcli run --cpu 4 --tp 2 (--fsdp 2 | --dp-replicate 2) mesh_fast_worker.py FOLDER ORIGINAL OUT`.

FOLDER is `tpcli shard ORIGINAL --tp 2`. On every rank: first transformers' own
`from_pretrained(ORIGINAL, distributed_config=DistributedConfig(tp_size=T, fsdp_size=F, dp_replicate_size=R,
tp_plan=FOLDER's --plan or "auto"))` (the oracle), then `tpcli.load_model(FOLDER)` twice: the second call with this process's `rchar` (/proc/self/io: the
bytes passed to read/pread syscalls, from the page cache or not) read before and after. The first call imports the
modules a load needs (~130 KB of .pyc per rank, read once per process): the second counts what a load reads from
the folder. Rank r writes OUT/rank{r}.json:
  * fast: the fast path ran (`model.tpcli_bytes_read` is set), bytes_read: what it counted;
  * rchar: the rchar delta around the second `tpcli.load_model`; rchar_first: around the first;
  * mismatch: parameters whose placements or local tensor (torch.equal) differ from transformers' own load;
  * logits_max_abs: max |logits(ours) - logits(transformers' own)| on a fixed batch (fp32).
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig
from worker_common import param_mismatches, rchar  # noqa: E402  (this script's folder is on sys.path)

import tpcli
from tpcli.formats import manifest

folder, original, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
IDS = torch.tensor([[1, 17, 256, 3, 999, 42, 7, 512], [1, 5, 6, 7, 8, 900, 13, 21]])


m = tpcli.mesh_info().mesh
plan = manifest.user_plan(manifest.read(Path(folder))) or "auto"  # the folder's --plan, if it was sharded with one
theirs = AutoModelForCausalLM.from_pretrained(original, distributed_config=DistributedConfig(
    tp_size=m.tp, fsdp_size=m.fsdp, dp_replicate_size=m.dp_replicate, tp_plan=plan))
first = rchar()
tpcli.load_model(folder)  # imports: see the docstring
before = rchar()
rchar_first = before - first
ours = tpcli.load_model(folder)
read = rchar() - before


mismatch = param_mismatches(ours, theirs)
theirs_params = dict(theirs.named_parameters())

with torch.no_grad():
    got, want = ours(IDS).logits, theirs(IDS).logits
    got = got.full_tensor() if hasattr(got, "full_tensor") else got
    want = want.full_tensor() if hasattr(want, "full_tensor") else want
rank = torch.distributed.get_rank()
out.mkdir(parents=True, exist_ok=True)
(out / f"rank{rank}.json").write_text(json.dumps({
    "fast": hasattr(ours, "tpcli_bytes_read"),
    "bytes_read": getattr(ours, "tpcli_bytes_read", None),
    "rchar": read,
    "rchar_first": rchar_first,
    "coordinate": {n: c for n, c in zip(ours._device_mesh.mesh_dim_names, ours._device_mesh.get_coordinate(),
                                        strict=True)},
    "mismatch": mismatch,
    "n_params": len(theirs_params),
    "placements": sorted({repr(getattr(p, "placements", None)) for p in theirs_params.values()}),
    "logits_max_abs": (got - want).abs().max().item(),
}))

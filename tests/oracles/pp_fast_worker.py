"""Worker for `tpcli run --cpu W --tp T [--pp P] --model FOLDER pp_fast_worker.py FOLDER ORIGINAL OUT`.

FOLDER is `tpcli shard ORIGINAL --tp T --pp P`. On every rank: first the oracle, ORIGINAL loaded on the same mesh by
transformers (`from_pretrained(ORIGINAL, distributed_config=DistributedConfig(tp_size=T, pp_size=P))`; at T > 1
with its TP plan limited to the modules the stage kept, `tpcli.runtime.pipeline_tp`, without which transformers
5.23 crashes), then `tpcli.load_model(FOLDER)` twice: the second with this process's `rchar` (/proc/self/io: the
bytes passed to read/pread syscalls) read before and after (the first imports what a load needs). Rank r writes
OUT/rank{r}.json:
  * fast: the fast path ran (`model.tpcli_bytes_read` is set), bytes_read: what it counted; rchar: the delta;
  * names: the state-dict tensors this rank holds; mismatch: parameters whose placements or local tensor differ
    from the oracle's (`worker_common.param_mismatches`);
  * logits_max_abs: max |logits(load_model) - logits(one process)| (fp32); tokens_equal: 4 greedy tokens equal.
"""

import contextlib
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig
from worker_common import param_mismatches, rchar  # noqa: E402  (this script's folder is on sys.path)

import tpcli
from tpcli.runtime.pipeline_tp import stage_tp_plan

folder, original, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
IDS = torch.tensor([[1, 17, 256, 3, 999, 42, 7, 512], [1, 5, 6, 7, 8, 900, 13, 21]])


m = tpcli.mesh_info().mesh
with stage_tp_plan() if m.tp > 1 else contextlib.nullcontext():
    theirs = AutoModelForCausalLM.from_pretrained(original, distributed_config=DistributedConfig(
        tp_size=m.tp, pp_size=m.pp))
tpcli.load_model(folder)  # imports: see the docstring
before = rchar()
ours = tpcli.load_model(folder)
read = rchar() - before
single = AutoModelForCausalLM.from_pretrained(original)
with torch.no_grad():
    logits = ours(IDS).logits
    logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
    tokens = ours.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref_tokens = single.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    diff = (logits - single(IDS).logits).abs().max().item()
rank = torch.distributed.get_rank()
out.mkdir(parents=True, exist_ok=True)
(out / f"rank{rank}.json").write_text(json.dumps({
    "fast": hasattr(ours, "tpcli_bytes_read"),
    "bytes_read": getattr(ours, "tpcli_bytes_read", None),
    "rchar": read,
    "names": sorted(ours.state_dict()),
    "mismatch": param_mismatches(ours, theirs),
    "n_params": len(dict(theirs.named_parameters())),
    "placements": sorted({repr(getattr(p, "placements", None)) for p in ours.parameters()}),
    "logits_max_abs": diff,
    "tokens_equal": bool(torch.equal(tokens, ref_tokens)),
}))

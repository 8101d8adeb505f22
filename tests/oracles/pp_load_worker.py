"""Worker for `tpcli run --cpu W [--tp T] --pp P pp_load_worker.py MODEL OUT`: what `tpcli.load_model` holds.

On every rank: `tpcli.load_model()` (the mesh from TPCLI_MESH; on tp x pp with transformers' TP plan limited to
the modules the stage kept, `tpcli.runtime.pipeline_tp`), then, measured on the real loaded model:
  * names / weight_bytes: the state-dict tensors this rank holds (tied ones once), local bytes (`to_local()`);
  * logits_max_abs and tokens_equal: its logits and 4 greedy tokens against the single-process model's;
  * kv_cache_storage_bytes: every storage reachable from the cache of a B x L forward (tests/oracles/cache_walk.py).
Rank r writes OUT/rank{r}.json.
"""

import json
import sys
from pathlib import Path

import torch
from cache_walk import cache_bytes, nbytes  # noqa: E402  (this script's folder is on sys.path)

import tpcli

model_dir, out, batch, seq_len = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
IDS = torch.tensor([[1, 17, 256, 3, 999, 42, 7, 512], [1, 5, 6, 7, 8, 900, 13, 21]])

model = tpcli.load_model(model_dir, experts_implementation="eager")
from transformers import AutoModelForCausalLM  # noqa: E402

single = AutoModelForCausalLM.from_pretrained(model_dir, experts_implementation="eager")
unique: dict[int, tuple] = {}
for name, t in model.state_dict(keep_vars=True).items():
    unique.setdefault(id(t), (name, t))
with torch.no_grad():
    logits = model(IDS).logits
    logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
    tokens = model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref = single.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    cache = model(ids, use_cache=True).past_key_values
    diff = (logits - single(IDS).logits).abs().max().item()
rank = torch.distributed.get_rank()
out.mkdir(parents=True, exist_ok=True)
(out / f"rank{rank}.json").write_text(json.dumps({
    "mesh": tpcli.mesh_info(model).to_dict(),
    "names": sorted(n for n, _ in unique.values()),
    "weight_bytes": sum(nbytes(t) for _, t in unique.values()),
    "placements": sorted({repr(getattr(p, "placements", None)) for p in model.parameters()}),
    "logits_max_abs": diff,
    "tokens_equal": bool(torch.equal(tokens, ref)),
    "kv_cache_storage_bytes": cache_bytes(cache)["storage_bytes"],
}))

"""Oracle worker (run under torchrun): the bytes each rank really holds under a transformers N-D mesh.

    torchrun --nproc-per-node W mesh_oracle.py OUT CASE [CASE ...] [--batch B] [--seq-len L]

CASE is `MODEL_DIR@tp=T,fsdp=F,dp_replicate=R,ep=E[,kernel=default]` (missing sizes are 1; T x F x R must be W).
For every case, on every rank: `from_pretrained(dir, distributed_config=DistributedConfig(tp_size=T, fsdp_size=F,
dp_replicate_size=R, ep_size=E))`, then
  * coords: this rank's coordinates on the dense mesh (dp_replicate, fsdp, tp) and the expert mesh (efsdp, ep);
  * logits_max_abs: the largest difference of its logits on a fixed batch from the single-process model's;
  * weights: local bytes (`to_local()`) of every state-dict tensor (tied parameters once), and of parameters alone;
  * gradients: `model(ids, labels=ids).loss.backward()` over this rank's B x L seeded random tokens (a different
    batch per data-parallel rank), local bytes of every `param.grad`;
  * optimizer: one `torch.optim.AdamW` step, local bytes of its state tensors (0-d `step` tensors counted apart);
  * KV cache: on the fresh numerics load, a no_grad forward with `use_cache=True` over this rank's B x L tokens,
    then every storage reachable from the returned cache object, each once (tests/oracles/cache_walk.py).
Rank r writes OUT.rank{r}.json: {CASE: {...}}. MoE experts run `experts_implementation="eager"` (memory does not
depend on the kernel) unless the case says `kernel=default` (transformers' own pick, grouped_mm).
"""

import argparse
import gc
import json
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("cases", nargs="+")
parser.add_argument("--batch", type=int, default=2)
parser.add_argument("--seq-len", type=int, default=8)
args = parser.parse_args()

dist.init_process_group("gloo", timeout=timedelta(seconds=90))  # collectives fail well inside the test timeout
rank = dist.get_rank()
from cache_walk import adamw_step_bytes, cache_bytes, local, nbytes  # noqa: E402  (this script's folder is on sys.path)
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402
from worker_common import end_job  # noqa: E402  (this script's folder is on sys.path)


def parse(case: str) -> tuple[str, dict]:
    folder, _, spec = case.rpartition("@")
    sizes = {"tp": 1, "fsdp": 1, "dp_replicate": 1, "ep": 1}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        sizes[key] = value if key == "kernel" else int(value)
    return folder, sizes


FIXED_IDS = torch.tensor([[1, 17, 256, 3, 999, 42, 7, 512], [1, 5, 6, 7, 8, 900, 13, 21]])


def measure(case: str) -> dict:
    folder, sizes = parse(case)
    kernel = {} if sizes.pop("kernel", None) == "default" else {"experts_implementation": "eager"}
    dc = DistributedConfig(tp_size=sizes["tp"], fsdp_size=sizes["fsdp"], dp_replicate_size=sizes["dp_replicate"],
                           ep_size=sizes["ep"])
    model = AutoModelForCausalLM.from_pretrained(folder, distributed_config=dc, **kernel)
    mm = model._mesh_manager
    dense = dict(zip(("pp", "dp_replicate", "fsdp", "tp"), mm._dense_mesh.get_coordinate(), strict=True))
    expert = dict(zip(("pp", "dp_replicate", "efsdp", "ep"), mm._expert_mesh.get_coordinate(), strict=True))
    params = dict(model.named_parameters())  # tied parameters once, under their first name
    unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    out: dict = {
        "sizes": sizes,
        "coords": {**dense, "efsdp": expert["efsdp"], "ep": expert["ep"]},
        "weight_bytes": sum(nbytes(t) for t in unique.values()),
        "parameter_bytes": sum(nbytes(p) for p in params.values()),
        "params": {n: {"local_shape": list(local(p).shape),
                       "placements": [repr(x) for x in getattr(p, "placements", ())]} for n, p in params.items()},
    }
    vocab = model.config.get_text_config().vocab_size
    dp_rank = dense["dp_replicate"] * sizes["fsdp"] + dense["fsdp"]  # ranks of one TP group share a batch
    gen = torch.Generator().manual_seed(dp_rank)
    ids = torch.randint(3, vocab, (args.batch, args.seq_len), generator=gen)
    model.train()
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in params.items() if p.grad is not None}
    out["grad_bytes"] = sum(nbytes(g) for g in grads.values())
    out["grads"] = {n: list(local(g).shape) for n, g in grads.items()}
    out["optimizer_bytes"], out["optimizer_step_tensors"] = adamw_step_bytes(model)
    del model, params, unique, grads
    gc.collect()
    # numerics on a fresh load: a no_grad forward before the backward above would change it (measured: FSDP2's
    # keep_full_weight tail then gets no gradients), so the two are measured on separate loads
    model = AutoModelForCausalLM.from_pretrained(folder, distributed_config=dc, **kernel)
    with torch.no_grad():
        logits = model(FIXED_IDS).logits
        logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
        reference = AutoModelForCausalLM.from_pretrained(folder, **kernel)(FIXED_IDS).logits
        cache = model(ids, use_cache=True).past_key_values
    out["logits_max_abs"] = (logits - reference).abs().max().item()
    held = cache_bytes(cache)
    out["kv_cache_storage_bytes"], out["kv_cache_tensor_bytes"] = held["storage_bytes"], held["tensor_bytes"]
    del model, cache
    gc.collect()
    dist.barrier()
    return out


result = {case: measure(case) for case in args.cases}
Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(result, indent=1))
end_job()

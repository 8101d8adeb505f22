"""Oracle worker (run under torchrun): the bytes each rank really holds under transformers' TP.

    torchrun --nproc-per-node N memory_oracle.py OUT.json MODEL_DIR [MODEL_DIR ...] --batch B --seq-len L
             [--eager-experts] [--cache-only]

For every model folder, on every rank: `from_pretrained(dir, tp_plan="auto")`, then
  * weights: local bytes of every state-dict tensor (tied parameters once), as `inspect` counts them;
  * KV cache: a forward with `use_cache=True` over B x L seeded random tokens, then every tensor reachable from
    the cache object (K/V, MLA latents, linear-attention conv/recurrent states, MiniMax's linear_cache, ...;
    tests/oracles/cache_walk.py): their own bytes (numel x element size) and the bytes of the storages they keep
    alive, each storage once (a slice is a view: it keeps the storage it was cut from);
  * gradients: `model(ids, labels=ids).loss.backward()`, local bytes of every `param.grad`, with its placements;
  * optimizer: one `torch.optim.AdamW` step, local bytes of its state tensors (0-d `step` tensors counted apart).
`--cache-only` stops after the cache (no backward, no optimizer). Rank r writes OUT.json's sibling OUT.rank{r}.json; {model_dir: {...}}.
"""

import argparse
import json
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("models", nargs="+")
parser.add_argument("--batch", type=int, default=2)
parser.add_argument("--seq-len", type=int, default=40)
parser.add_argument("--eager-experts", action="store_true")
parser.add_argument("--cache-only", action="store_true")
args = parser.parse_args()

dist.init_process_group("gloo", timeout=timedelta(seconds=90))  # collectives fail well inside the test timeout
rank = dist.get_rank()
from cache_walk import adamw_step_bytes, cache_bytes, local, nbytes  # noqa: E402  (this script's folder is on sys.path)
from transformers import AutoModelForCausalLM  # noqa: E402
from worker_common import end_job  # noqa: E402  (this script's folder is on sys.path)


def placements(t) -> list[str]:
    return [repr(p) for p in t.placements] if hasattr(t, "placements") else ["Replicate()"]


def measure(folder: str) -> dict:
    kwargs = {"experts_implementation": "eager"} if args.eager_experts else {}
    model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", **kwargs)
    params = dict(model.named_parameters())  # tied parameters once, under their first name
    unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}  # tied parameters once
    out: dict = {
        "weight_bytes": sum(nbytes(t) for t in unique.values()),
        "parameter_bytes": sum(nbytes(p) for p in params.values()),
        "params": {n: {"local_shape": list(local(p).shape), "placements": placements(p)} for n, p in params.items()},
    }
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch, args.seq_len), generator=gen)

    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    layers = []
    for layer in getattr(cache, "layers", []):
        kv = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if torch.is_tensor(t)]
        layers.append({"type": type(layer).__name__, "shapes": [list(t.shape) for t in kv]})
    held = cache_bytes(cache)
    out["kv_cache_tensor_bytes"] = held["tensor_bytes"]
    out["kv_cache_storage_bytes"] = held["storage_bytes"]
    out["kv_cache_dtypes"] = held["dtypes"]
    out["kv_cache_layers"] = layers
    del cache
    if args.cache_only:
        return out

    model.train()
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in params.items() if p.grad is not None}
    out["grad_bytes"] = sum(nbytes(g) for g in grads.values())
    out["grads"] = {n: {"local_shape": list(local(g).shape), "placements": placements(g),
                        "is_dtensor": hasattr(g, "placements")} for n, g in grads.items()}

    out["optimizer_bytes"], out["optimizer_step_tensors"] = adamw_step_bytes(model)
    return out


result = {folder: measure(folder) for folder in args.models}
Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(result, indent=1))
end_job()

"""Oracle worker (run under torchrun): what each rank really holds under transformers' pipeline parallelism.

    torchrun --nproc-per-node P pp_oracle.py OUT CASE [CASE ...] [--batch B] [--seq-len L]

CASE is `MODEL_DIR@pp=P` (P must be the world size). For every case, on every rank:
`from_pretrained(dir, distributed_config=DistributedConfig(pp_size=P))` (transformers' own
`apply_pipeline_parallelism`: `PipelineStage.layer_range_for_rank`, `PipelineIdentityLayer` for the rest), then
  * coords: this rank's coordinates on the dense mesh (pp, dp_replicate, fsdp, tp);
  * names / weight_bytes: the state-dict tensors this rank holds (tied ones once) and their bytes;
  * parameter_bytes: the parameters' bytes;
  * logits_max_abs: its logits on a fixed batch (broadcast from the last stage) against the single-process model's;
  * tokens_equal: greedy `generate` of 4 tokens equals the single process's;
  * KV cache: a no_grad forward with `use_cache=True` over B x L seeded tokens, every storage reachable from the
    returned cache object, each once (tests/oracles/cache_walk.py).
Rank r writes OUT.rank{r}.json: {CASE: {...}}. MoE experts run `experts_implementation="eager"`.
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
from cache_walk import cache_bytes, nbytes  # noqa: E402  (this script's folder is on sys.path)
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402
from worker_common import end_job  # noqa: E402  (this script's folder is on sys.path)

FIXED_IDS = torch.tensor([[1, 17, 256, 3, 999, 42, 7, 512], [1, 5, 6, 7, 8, 900, 13, 21]])


def measure(case: str) -> dict:
    folder, _, spec = case.rpartition("@")
    sizes = {k: int(v) for k, v in (item.split("=") for item in spec.split(","))}
    dc = DistributedConfig(**{f"{k}_size": v for k, v in sizes.items()})
    kernel = {"experts_implementation": "eager"}
    model = AutoModelForCausalLM.from_pretrained(folder, distributed_config=dc, **kernel)
    dense = dict(zip(("pp", "dp_replicate", "fsdp", "tp"), model._mesh_manager._dense_mesh.get_coordinate(),
                     strict=True))
    unique: dict[int, tuple[str, torch.Tensor]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        unique.setdefault(id(t), (name, t))
    out: dict = {
        "sizes": sizes,
        "coords": dense,
        "names": sorted(n for n, _ in unique.values()),
        "weight_bytes": sum(nbytes(t) for _, t in unique.values()),
        "parameter_bytes": sum(nbytes(p) for p in dict(model.named_parameters()).values()),
    }
    reference = AutoModelForCausalLM.from_pretrained(folder, **kernel)
    with torch.no_grad():
        logits = model(FIXED_IDS).logits
        out["logits_max_abs"] = (logits - reference(FIXED_IDS).logits).abs().max().item()
        ours = model.generate(FIXED_IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
        theirs = reference.generate(FIXED_IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
        out["tokens_equal"] = bool(torch.equal(ours, theirs))
        vocab = model.config.get_text_config().vocab_size
        ids = torch.randint(3, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
        cache = model(ids, use_cache=True).past_key_values
    held = cache_bytes(cache)
    out["kv_cache_storage_bytes"], out["kv_cache_tensor_bytes"] = held["storage_bytes"], held["tensor_bytes"]
    del model, reference, cache
    gc.collect()
    dist.barrier()
    return out


result = {case: measure(case) for case in args.cases}
Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(result, indent=1))
end_job()

"""Oracle worker (torchrun, 2 ranks, CPU/gloo): what transformers does with sequence parallelism at tp=2.

    torchrun --nproc-per-node 2 sp_worker.py MODEL_DIR PLAN_JSON OUT

On every rank, three loads of MODEL_DIR and the single-process model:
  * base: `DistributedConfig(tp_size=2)`;
  * flag: `DistributedConfig(tp_size=2, enable_sequence_parallel=True)` (5.23 declares it, "not wired up yet");
  * plan: `DistributedConfig(tp_size=2, tp_plan=PLAN_JSON)`, a user plan using the `sequence_parallel` style.
Rank r writes OUT.rank{r}.json:
  * flag_mismatch: parameters of `flag` whose placements or local tensors differ from `base`'s; flag_hooks_equal:
    both models carry the same forward (pre-)hooks per module; flag_logits_equal: torch.equal of their logits;
    flag_outputs_equal: every decoder layer's output equal (shape and values) under both;
  * plan_error: the exception's class and text when the plan load or its forward fails, else null;
  * plan_weight_bytes / base_weight_bytes: the local parameter bytes (tied once) of `plan` and `base`;
  * plan_placements: {name: placements} of the parameters the plan's `sequence_parallel` rules name;
  * plan_logits_max_abs: max |logits(plan) - logits(one process)| (fp32), plan_tokens_equal: 4 greedy tokens equal.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from cache_walk import nbytes  # noqa: E402  (this script's folder is on sys.path)
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig
from worker_common import end_job, param_mismatches  # noqa: E402

model_dir, plan, out = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), sys.argv[3]
IDS = torch.tensor([[1, 17, 256, 3, 999, 42, 7, 512], [1, 5, 6, 7, 8, 900, 13, 21]])


def load(**kw):
    return AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=DistributedConfig(tp_size=2, **kw))


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def hooks(model) -> dict:
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def weight_bytes(model) -> int:
    unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    return sum(nbytes(t) for t in unique.values())


def layer_outputs(model) -> list:
    with torch.no_grad():
        states = model(IDS, output_hidden_states=True).hidden_states
    return [full(h) for h in states]


base = load()
flag = load(enable_sequence_parallel=True)
single = AutoModelForCausalLM.from_pretrained(model_dir)
with torch.no_grad():
    base_logits, flag_logits = full(base(IDS).logits), full(flag(IDS).logits)
    ref, ref_tokens = single(IDS).logits, single.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
base_h, flag_h = layer_outputs(base), layer_outputs(flag)
result = {
    "flag_config": bool(flag.config.distributed_config.enable_sequence_parallel),
    "flag_mismatch": param_mismatches(flag, base),
    "flag_hooks_equal": hooks(flag) == hooks(base),
    "flag_logits_equal": bool(torch.equal(flag_logits, base_logits)),
    "flag_outputs_equal": len(base_h) == len(flag_h) and all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(base_h, flag_h, strict=True)),
    "base_logits_max_abs": (base_logits - ref).abs().max().item(),
    "base_weight_bytes": weight_bytes(base),
    "plan_error": None,
}
try:
    planned = load(tp_plan=plan)
    params = dict(planned.named_parameters())
    styled = [k.replace(".*.", ".0.") for k, v in plan.items() if v == "sequence_parallel"]
    result["plan_placements"] = {f"{k}.weight": repr(getattr(params.get(f"{k}.weight"), "placements", None))
                                 for k in styled}
    result["plan_weight_bytes"] = weight_bytes(planned)
    with torch.no_grad():
        logits = full(planned(IDS).logits)
        tokens = planned.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    result["plan_logits_max_abs"] = (logits - ref).abs().max().item()
    result["plan_tokens_equal"] = bool(torch.equal(tokens, ref_tokens))
except Exception as exc:  # what is measured: whether transformers loads and runs such a plan
    result["plan_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
Path(f"{out}.rank{dist.get_rank()}.json").write_text(json.dumps(result))
end_job()

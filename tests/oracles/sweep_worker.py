"""Sweep worker (run under torchrun): does transformers' own TP forward run, and compute the right numbers?

    torchrun --nproc-per-node N sweep_worker.py CASES.json OUT.json START

CASES.json is a list of `{"id": ..., "path": model folder, "plan": plan file or null, "mesh": null or {"tp": T,
"fsdp": F, "dp_replicate": R, "ep": E}}`. For each case every rank loads the model with `from_pretrained(tp_plan=...)`,
or with a mesh `from_pretrained(distributed_config=DistributedConfig(tp_size=T, fsdp_size=F, dp_replicate_size=R,
ep_size=E))` (every rank feeds the same batch); the class is the one `architectures` names. It loads the plain
single-process model too, runs a prompt with `use_cache=True` and then one decode step from that cache on both, and
compares both logits (rank 0 also records the largest error over the ranks, `max_abs`).
Outcome per case and rank: "ok", "wrong: <max abs error>" or "crash: <first line of the exception>". Ranks meet
after each case through the store (not a collective). A crash on some ranks only can leave the others stuck in a
collective until the group times out, and the process group unusable: the worker then stops after that case and
rank 0 writes `{"results": {id: {rank: outcome}}, "next": index of the first case not run}` for the caller to
start a new launch from there.
"""

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

TOLERANCE = 1e-5  # fp32
CASE_TIMEOUT = timedelta(seconds=60)

dist.init_process_group("gloo", timeout=timedelta(seconds=15))  # a collective one rank never joins fails fast
rank, world = dist.get_rank(), dist.get_world_size()
store = dist.distributed_c10d._get_default_store()
from transformers import AutoConfig  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from tpcli.planning.plan import model_class  # noqa: E402

hf_logging.disable_progress_bar()
cases = json.loads(Path(sys.argv[1]).read_text())


def _full(logits):
    return logits.full_tensor() if hasattr(logits, "full_tensor") else logits


def run_case(path: str, plan, mesh=None) -> str:
    config = AutoConfig.from_pretrained(path)
    cls = model_class(config)
    vocab = config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    if mesh is None:
        kwargs = {"tp_plan": plan}
    else:
        from transformers.distributed import DistributedConfig

        kwargs = {"distributed_config": DistributedConfig(tp_size=mesh["tp"], fsdp_size=mesh["fsdp"],
                                                          dp_replicate_size=mesh["dp_replicate"], ep_size=mesh["ep"])}
    with torch.no_grad():
        outs = []
        for model in (cls.from_pretrained(path, **kwargs), cls.from_pretrained(path)):
            prompt = model(input_ids=ids, use_cache=True)
            logits = _full(prompt.logits)
            step_ids = logits[:, -1:].argmax(-1) if not outs else outs[0][2]
            step = model(input_ids=step_ids, past_key_values=prompt.past_key_values, use_cache=True)
            outs.append((logits.float(), _full(step.logits).float(), step_ids))
    (tp_prompt, tp_step, _), (ref_prompt, ref_step, _) = outs
    err = max((tp_prompt - ref_prompt).abs().max().item(), (tp_step - ref_step).abs().max().item())
    last_err["err"] = err
    return "ok" if err <= TOLERANCE else f"wrong: max abs error {err:.3g}"


def _stuck(outcome: str) -> bool:
    """A rank that waited in a collective its peers never joined (they crashed before it): gloo timed out or
    dropped the connection. Ranks that crash with different messages but were never stuck leave the group usable."""
    return outcome.startswith("crash") and ("gloo" in outcome or "timed out" in outcome.lower())


results, start, stop = {}, int(sys.argv[3]), len(cases)
last_err: dict[str, float] = {}  # this rank's logits error of the case being run, once it ran
max_abs_by_id: dict[str, float | None] = {}  # case id -> largest logits error over all ranks (None: no forward)
for i in range(start, len(cases)):
    case = cases[i]
    last_err.clear()
    plan = json.loads(Path(case["plan"]).read_text()) if case.get("plan") else "auto"
    try:
        outcome = run_case(case["path"], plan, case.get("mesh"))
    except Exception as exc:  # noqa: BLE001 - every failure of the TP forward is an outcome to record
        outcome = f"crash: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
    if outcome != "ok":  # in the launch's stderr: names the case if its peers then hang and the launch fails
        print(f"sweep case {case['id']}: rank {rank}: {outcome}", file=sys.stderr, flush=True)
    store.set(f"sweep/{i}/{rank}", outcome)
    store.wait([f"sweep/{i}/{r}" for r in range(world)], CASE_TIMEOUT)
    results[case["id"]] = {r: store.get(f"sweep/{i}/{r}").decode() for r in range(world)}
    store.set(f"sweep/{i}/{rank}/err", repr(last_err.get("err")))
    errs = [store.get(f"sweep/{i}/{r}/err").decode() for r in range(world)]
    max_abs_by_id[case["id"]] = max((float(e) for e in errs if e != "None"), default=None)
    if any(_stuck(o) for o in results[case["id"]].values()):  # the gloo group is broken: relaunch after this case
        stop = i + 1
        break

if rank == 0:
    Path(sys.argv[2]).write_text(json.dumps({"results": results, "max_abs": max_abs_by_id, "next": stop}, indent=1))
if stop < len(cases):
    os._exit(0)  # a broken gloo group can hang in destroy_process_group
dist.destroy_process_group()

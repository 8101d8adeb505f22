"""Worker of `tpcli verify --numerics` (started through `tpcli.commands.run`, like `tpcli run`).

    python -m tpcli.runtime.numerics MODEL OUT.json [--plan FILE|NAME]

Every rank loads the model with the TP plan through `tpcli.load_model` (transformers' own
`from_pretrained(tp_plan=...)`, plus the worker-side adaptations of a plans/ entry), rank 0 also loads
the plain single-process model, both run one fixed batch with `output_hidden_states=True` and greedy-decode a few
tokens. Rank 0 writes, per decoder layer and for the logits, the max absolute and relative error.

On GPUs (`verify --numerics --gpus`) the TP model lives on cuda:LOCAL_RANK and gets its inputs there; the reference
stays on rank 0's CPU (the oracle), and every comparison is made on the CPU.

While rank 0 loads and runs the reference (minutes to an hour on the CPU for a model of tens of GB), ranks
1..N-1 have nothing to do. They must not wait for it in a collective of the job's process group: that one fails
after the group's timeout (`tpcli.runtime.process_group.process_group_timeout`: 2 hours, or TPCLI_TIMEOUT), sized for
the TP load, not for the reference. They wait instead in a barrier of a second group, gloo (host-side), made for
that wait alone, whose timeout is REFERENCE_WAIT_S (`wait_group`). If rank 0 crashes meanwhile, torchrun's agent
stops the other ranks at once: the long timeout only bounds a hang. The reference runs with every core this process may use (`all_cores`): torchrun
sets OMP_NUM_THREADS=1 for each worker, and the other ranks are idle then.

The model class is the one the checkpoint declares (`architectures` in config.json, as `tpcli.planning.plan` builds it), so a
multimodal checkpoint (Qwen2_5_VLForConditionalGeneration, Gemma3ForConditionalGeneration) is compared on its text
path: `input_ids` only, no pixels.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from datetime import timedelta
from pathlib import Path

BATCH, SEQ, NEW_TOKENS = 2, 12, 4
REFERENCE_WAIT_S = 6 * 3600  # how long ranks 1..N-1 wait for rank 0's reference (loading and running it on the CPU)


def fixed_batch(vocab_size: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, vocab_size, (BATCH, SEQ), generator=g)
    ids[:, 0] = 1
    return ids


def _errors(a, b) -> dict:
    a, b = a.float(), b.float()
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item() or 1.0
    return {"max_abs": diff, "max_rel": diff / scale}


_REFERENCES: dict[str, tuple] = {}


@contextlib.contextmanager
def all_cores():
    """torch's intra-op threads set to the cores this process may run on (its affinity mask), restored on exit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def wait_group():
    """Collective: a gloo group over the whole world whose barrier waits up to REFERENCE_WAIT_S, whatever the job's
    process group timeout is (gloo: host-side, so it needs no device and has no NCCL watchdog)."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=timedelta(seconds=REFERENCE_WAIT_S))


def _reference(model: str, ids):
    """The single-process model's (dtype, outputs, greedy tokens) for the fixed batch, once per model path, computed
    with all the cores this process may use."""
    if model not in _REFERENCES:
        with all_cores():
            _REFERENCES[model] = _run_reference(model, ids)
    return _REFERENCES[model]


def _run_reference(model: str, ids):
    import torch
    from transformers import AutoConfig

    from tpcli.planning.plan import check_config_files, model_class

    # the class the checkpoint declares, as load_model builds it (e.g. Qwen2.5-VL)
    check_config_files(model)
    ref_model = model_class(AutoConfig.from_pretrained(model)).from_pretrained(model)
    with torch.no_grad():
        ref_out = ref_model(input_ids=ids, output_hidden_states=True)
        ref_tokens = ref_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return str(ref_model.dtype).removeprefix("torch."), ref_out, ref_tokens


def compare(model: str, plan: str | None = None, *, load_from: str | None = None) -> dict | None:
    """Collective: every rank loads the TP model (from `load_from`, e.g. a sharded folder, else `model`) and runs
    the batch; rank 0 returns the errors against the single-process `model`, with the process group's backend and
    each rank's device; the other ranks None."""
    import torch
    import torch.distributed as dist

    from tpcli.planning.plans_library import load_spec
    from tpcli.runtime.loading import load_model

    rank = dist.get_rank()
    rules, library = load_spec(plan) if plan else ("auto", None)
    # the same loader as `tpcli run` workers: a library plan's adaptations are part of what is verified
    tp_model = load_model(load_from or model, tp_plan=library or rules)
    ids = fixed_batch(tp_model.config.get_text_config().vocab_size)
    device = tp_model.device
    with torch.no_grad():
        tp_out = tp_model(input_ids=ids.to(device), output_hidden_states=True)
        try:  # a wrong plan can run the prompt yet crash on a 1-token step: report it, keep the forward numbers
            tp_tokens, generate_error = tp_model.generate(ids.to(device), max_new_tokens=NEW_TOKENS, do_sample=False,
                                                          pad_token_id=0), None
        except RuntimeError as exc:
            tp_tokens, generate_error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    devices = [None] * dist.get_world_size()  # where each rank's TP model ran: the evidence that GPUs were used
    dist.all_gather_object(devices, str(device))
    if rank != 0:
        return None
    dtype, ref_out, ref_tokens = _reference(model, ids)
    layers = []
    # hidden_states[0] is the embedding output, [i] the output of decoder layer i-1 (the last one after the norm);
    # transformers' PP forward returns the logits alone (each stage holds only its layers' hidden states)
    for i, (a, b) in enumerate(zip(tp_out.hidden_states or (), ref_out.hidden_states if tp_out.hidden_states
                                   is not None else (), strict=True)):
        layers.append({"name": "embeddings" if i == 0 else f"layer {i - 1}", **_errors(a.cpu(), b)})
    return {
        "dtype": dtype,
        "world_size": dist.get_world_size(),
        "backend": str(dist.get_backend()),
        "devices": devices,
        "layers": layers,
        "logits": _errors(tp_out.logits.cpu(), ref_out.logits),
        "tokens_equal": tp_tokens is not None and bool(torch.equal(tp_tokens.cpu(), ref_tokens)),
        "tokens_tp": tp_tokens[:, SEQ:].tolist() if tp_tokens is not None else None,
        "tokens_ref": ref_tokens[:, SEQ:].tolist(),
        "generate_error": generate_error,
    }


def main() -> None:
    import torch.distributed as dist

    from tpcli.runtime.process_group import start_process_group

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--plan")
    args = parser.parse_args()

    # the same set-up as tpcli.load_model: on GPUs, nccl with each rank bound to cuda:LOCAL_RANK before init (a bare
    # init_process_group("nccl") leaves every rank on GPU 0 until transformers binds it, and barrier() unbound)
    start_process_group()  # the timeout of every other job's group (`process_group_timeout`): the TP load is the same
    waiting = wait_group()
    result = compare(args.model, args.plan)
    if result is not None:
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier(group=waiting)  # ranks 1..N-1 are here while rank 0 computes the reference: not the job's group
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

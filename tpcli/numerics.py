"""Worker of `tpcli verify --numerics` (started through `tpcli.launch`, like `tpcli run`).

    python -m tpcli.numerics MODEL OUT.json [--plan FILE]

Every rank loads the model with the TP plan (transformers' own `from_pretrained(tp_plan=...)`), rank 0 also loads
the plain single-process model, both run one fixed batch with `output_hidden_states=True` and greedy-decode a few
tokens. Rank 0 writes, per decoder layer and for the logits, the max absolute and relative error.

On GPUs (`verify --numerics --gpus`) the TP model lives on cuda:LOCAL_RANK and gets its inputs there; the reference
stays on rank 0's CPU (the oracle), and every comparison is made on the CPU.

The model class is the one the checkpoint declares (`architectures` in config.json, as `tpcli.plan` builds it), so a
multimodal checkpoint (Qwen2_5_VLForConditionalGeneration, Gemma3ForConditionalGeneration) is compared on its text
path: `input_ids` only, no pixels.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

BATCH, SEQ, NEW_TOKENS = 2, 12, 4


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


def main() -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig

    from tpcli.loading import _init_process_group
    from tpcli.plan import _model_class

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--plan")
    args = parser.parse_args()

    # the same set-up as tpcli.load_model: on GPUs, nccl with each rank bound to cuda:LOCAL_RANK before init (a bare
    # init_process_group("nccl") leaves every rank on GPU 0 until transformers binds it, and barrier() unbound)
    _init_process_group(float(os.environ.get("TPCLI_TIMEOUT", 600)))
    rank = dist.get_rank()
    plan = json.loads(Path(args.plan).read_text()) if args.plan else "auto"
    if isinstance(plan, dict) and isinstance(plan.get("tp_plan"), dict):
        plan = plan["tp_plan"]
    model_class = _model_class(AutoConfig.from_pretrained(args.model))
    tp_model = model_class.from_pretrained(args.model, tp_plan=plan)
    ids = fixed_batch(tp_model.config.get_text_config().vocab_size)
    device = tp_model.device
    with torch.no_grad():
        tp_out = tp_model(input_ids=ids.to(device), output_hidden_states=True)
        try:  # a wrong plan can run the prompt yet crash on a 1-token step: report it, keep the forward numbers
            tp_tokens, generate_error = tp_model.generate(ids.to(device), max_new_tokens=NEW_TOKENS, do_sample=False,
                                                          pad_token_id=0), None
        except RuntimeError as exc:
            tp_tokens, generate_error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    if rank == 0:
        ref_model = model_class.from_pretrained(args.model)
        with torch.no_grad():
            ref_out = ref_model(input_ids=ids, output_hidden_states=True)
            ref_tokens = ref_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        layers = []
        # hidden_states[0] is the embedding output, [i] the output of decoder layer i-1 (the last one after the norm)
        for i, (a, b) in enumerate(zip(tp_out.hidden_states, ref_out.hidden_states, strict=True)):
            layers.append({"name": "embeddings" if i == 0 else f"layer {i - 1}", **_errors(a.cpu(), b)})
        result = {
            "dtype": str(ref_model.dtype).removeprefix("torch."),
            "world_size": dist.get_world_size(),
            "layers": layers,
            "logits": _errors(tp_out.logits.cpu(), ref_out.logits),
            "tokens_equal": tp_tokens is not None and bool(torch.equal(tp_tokens.cpu(), ref_tokens)),
            "tokens_tp": tp_tokens[:, SEQ:].tolist() if tp_tokens is not None else None,
            "tokens_ref": ref_tokens[:, SEQ:].tolist(),
            "generate_error": generate_error,
        }
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Inference replicas: each data-parallel group of TP ranks generates its own share of the prompts.

    tpcli run --gpus 8 --tp 4 --dp-replicate 2 -m tpcli.examples.replicas_generate --model DIR \\
        --prompt "Hello" --prompt "Tensor parallelism" --prompt "Bonjour" --prompt "FSDP"
    tpcli run --cpu 4 --tp 2 --dp-replicate 2 -m tpcli.examples.replicas_generate --model DIR

`tpcli.mesh_info(model)` gives this rank's data-parallel coordinate: prompt i goes to the replica with
dp_rank == i % dp_size; the TP ranks of a replica (same dp_rank) take the same prompts, as TP requires, and its
TP rank 0 prints one line per prompt: `prompt I (replica R): tokens [...]` (and the text with a tokenizer).
Without a tokenizer in the model folder a prompt is turned into token ids as in `tpcli.examples.generate`.
"""

import argparse
import json
import os
from pathlib import Path

import torch

import tpcli

DEFAULT_PROMPTS = ["Tensor parallelism splits", "Replicas serve", "A mesh of", "Data parallel ranks"]


def prompt_ids(prompt: str, tokenizer=None) -> torch.Tensor:
    if tokenizer is not None:
        return tokenizer(prompt, return_tensors="pt").input_ids
    return torch.tensor([[1] + [3 + (ord(c) % 200) for c in prompt]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("TPCLI_MODEL"), help="defaults to $TPCLI_MODEL")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat); default: four built-in prompts")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    prompts = args.prompt or DEFAULT_PROMPTS

    model = tpcli.load_model(args.model)
    info = tpcli.mesh_info(model)
    tokenizer = None
    if any((Path(args.model) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    mine = list(range(len(prompts)))[info.dp_rank::info.dp_size]
    for i in mine:
        ids = prompt_ids(prompts[i], tokenizer).to(model.device)
        with torch.no_grad():  # every replica decodes the same number of steps: no early stop
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                 do_sample=False, pad_token_id=model.generation_config.pad_token_id or 0)
        if info.tp_rank == 0:
            new = out[0, ids.shape[1]:].tolist()
            text = f" text {tokenizer.decode(new, skip_special_tokens=True)!r}" if tokenizer is not None else ""
            print(f"prompt {i} (replica {info.dp_rank}): tokens {json.dumps(new)}{text}", flush=True)


if __name__ == "__main__":
    main()

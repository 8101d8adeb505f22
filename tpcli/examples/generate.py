"""Greedy generation with a TP-sharded model.

    tpcli run --cpu 2 -m tpcli.examples.generate --model DIR --prompt "Hello"
    tpcli run --gpus 2 -m tpcli.examples.generate --model DIR --prompt "Hello"

Decodes text when the model folder has a tokenizer, prints token ids otherwise. Rank 0 prints.
"""

import argparse
import os
from pathlib import Path

import torch

import tpcli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("TPCLI_MODEL"), help="defaults to $TPCLI_MODEL")
    parser.add_argument("--prompt", default="Tensor parallelism splits")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    model = tpcli.load_model(args.model)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    tokenizer = None
    if any((Path(args.model) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    else:
        ids = torch.tensor([[1] + [3 + (ord(c) % 200) for c in args.prompt]])
    ids = ids.to(model.device)  # the tokenizer makes CPU tensors; on GPUs each rank's model is on cuda:LOCAL_RANK
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=model.generation_config.pad_token_id or 0)
    if rank == 0:
        new = out[0, ids.shape[1]:].tolist()
        print("tokens:", new)
        if tokenizer is not None:
            print("text:", repr(tokenizer.decode(new, skip_special_tokens=True)))


if __name__ == "__main__":
    main()

"""Load two checkpoints with plain `from_pretrained` (no TP) and compare their logits on a fixed batch.

    python -m tpcli.examples.compare_logits ORIGINAL OTHER [--atol 0]

Exits 1 if the max absolute difference exceeds --atol (default 0: identical).
"""

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("original")
    parser.add_argument("other")
    parser.add_argument("--atol", type=float, default=0.0)
    args = parser.parse_args()
    from transformers import logging

    logging.disable_progress_bar()
    ids = torch.tensor([[1, 17, 256, 3, 999, 42, 7, 512]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(args.original)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(args.other)(ids).logits
    diff = (a - b).abs().max().item()
    print(f"max |logits({args.other}) - logits({args.original})| = {diff:.3g}")
    sys.exit(0 if diff <= args.atol else 1)


if __name__ == "__main__":
    main()

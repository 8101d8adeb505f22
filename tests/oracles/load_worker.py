"""Worker for tests (run by `tpcli run`): load with tpcli.load_model and with transformers' own
from_pretrained(ORIGINAL, tp_plan="auto"), and compare them inside the process group.

    tpcli run --cpu N --model PATH load_worker.py ORIGINAL OUT [--dtype bfloat16]

Writes OUT/rank{r}.json: placements/local tensors equal?, bytes read, and (rank 0) OUT/logits.pt, OUT/tokens.pt.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import tpcli

INPUT_IDS = [[1, 17, 256, 3, 999, 42, 7, 512], [1, 5, 6, 7, 8, 900, 13, 21]]

parser = argparse.ArgumentParser()
parser.add_argument("original")
parser.add_argument("out")
parser.add_argument("--dtype")
args = parser.parse_args()
extra = {"dtype": getattr(torch, args.dtype)} if args.dtype else {}

ours = tpcli.load_model(**extra)  # path from $TPCLI_MODEL
rank = torch.distributed.get_rank()
theirs = AutoModelForCausalLM.from_pretrained(args.original, tp_plan="auto", **extra)

report = {"rank": rank, "world": torch.distributed.get_world_size(), "mismatch": [],
          "bytes_read": getattr(ours, "tpcli_bytes_read", None)}
a, b = ours.state_dict(keep_vars=True), theirs.state_dict(keep_vars=True)
if list(a) != list(b):
    report["mismatch"].append("state dict keys differ")
for name in b:
    x, y = a[name], b[name]
    px, py = getattr(x, "placements", None), getattr(y, "placements", None)
    lx = x.to_local() if px else x
    ly = y.to_local() if py else y
    if px != py or lx.dtype != ly.dtype or not torch.equal(lx.detach(), ly.detach()):
        report["mismatch"].append(name)
hooked = sorted(n for n, m in ours.named_modules() if getattr(m, "_is_hooked", False))
hooked_theirs = sorted(n for n, m in theirs.named_modules() if getattr(m, "_is_hooked", False))
report["hooks_equal"] = hooked == hooked_theirs
with torch.no_grad():
    ids = torch.tensor(INPUT_IDS)
    logits = ours(ids).logits
    ref = theirs(ids).logits
    tokens = ours.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
report["logits_equal_to_transformers_tp"] = bool(torch.equal(logits, ref))
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
(out / f"rank{rank}.json").write_text(json.dumps(report))
if rank == 0:
    torch.save(logits, out / "logits.pt")
    torch.save(tokens, out / "tokens.pt")

"""Oracle worker (run under torchrun): transformers' own TP load, and optionally its own DCP save.

    torchrun --nproc-per-node N tp_oracle.py SRC OUT [--plan FILE] [--dcp-out DIR] [--eager-experts]

Writes OUT/layout-rank{r}.json (per parameter: placements, global and local shape), OUT/logits.pt and
OUT/tokens.pt (rank 0) for a fixed batch, and with --dcp-out calls save_pretrained(distributed_checkpoint=True).
"""

import argparse
import json
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

INPUT_IDS = [[1, 17, 256, 3, 999, 42, 7, 512], [1, 5, 6, 7, 8, 900, 13, 21]]

parser = argparse.ArgumentParser()
parser.add_argument("src")
parser.add_argument("out")
parser.add_argument("--plan")
parser.add_argument("--dcp-out")
parser.add_argument("--eager-experts", action="store_true")
args = parser.parse_args()

dist.init_process_group("gloo", timeout=timedelta(seconds=90))  # collectives fail well inside the test timeout
rank = dist.get_rank()
from transformers import AutoModelForCausalLM  # noqa: E402
from worker_common import end_job  # noqa: E402  (this script's folder is on sys.path)

plan = json.loads(Path(args.plan).read_text()) if args.plan else "auto"
kwargs = {"experts_implementation": "eager"} if args.eager_experts else {}
model = AutoModelForCausalLM.from_pretrained(args.src, tp_plan=plan, **kwargs)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
layout = {}
for name, p in model.state_dict(keep_vars=True).items():
    is_d = hasattr(p, "placements")
    layout[name] = {
        "placements": [repr(x) for x in p.placements] if is_d else ["Replicate()"],
        "global_shape": list(p.shape),
        "local_shape": list(p.to_local().shape) if is_d else list(p.shape),
    }
(out / f"layout-rank{rank}.json").write_text(json.dumps(layout, indent=1))
with torch.no_grad():
    ids = torch.tensor(INPUT_IDS)
    logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
if rank == 0:
    torch.save(logits, out / "logits.pt")
    torch.save(tokens, out / "tokens.pt")
if args.dcp_out:
    model.save_pretrained(args.dcp_out, distributed_checkpoint=True)
end_job()

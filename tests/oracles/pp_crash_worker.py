"""Oracle worker (run under torchrun on 4 ranks): what transformers 5.23 does with tp_size=2 x pp_size=2.

    torchrun --nproc-per-node 4 pp_crash_worker.py MODEL_DIR OUT

Rank r writes OUT.rank{r}.json: {"type": the exception's class name, or null when the model loaded, "message"}.
"""

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

dist.init_process_group("gloo", timeout=timedelta(seconds=90))
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402
from worker_common import end_job  # noqa: E402  (this script's folder is on sys.path)

model_dir, out = sys.argv[1], sys.argv[2]
try:
    AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=DistributedConfig(tp_size=2, pp_size=2))
    result = {"type": None, "message": ""}
except Exception as exc:  # the crash is what is measured
    result = {"type": type(exc).__name__, "message": str(exc)[:300]}
Path(f"{out}.rank{dist.get_rank()}.json").write_text(json.dumps(result))
end_job()

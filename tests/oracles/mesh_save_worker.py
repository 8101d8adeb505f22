"""Oracle worker (run under torchrun): transformers' own load on a mesh and its own DCP save.

    torchrun --nproc-per-node W mesh_save_worker.py SRC OUT TP FSDP DP_REPLICATE EP

`from_pretrained(SRC, distributed_config=DistributedConfig(tp_size=TP, fsdp_size=FSDP,
dp_replicate_size=DP_REPLICATE, ep_size=EP))`, then `save_pretrained(OUT, distributed_checkpoint=True)` on every
rank (transformers drops `distributed_config` from the saved config.json: the mesh is not recorded).
"""

import sys
from datetime import timedelta

import torch.distributed as dist

src, out = sys.argv[1], sys.argv[2]
tp, fsdp, dp_replicate, ep = map(int, sys.argv[3:7])
dist.init_process_group("gloo", timeout=timedelta(seconds=90))  # collectives fail well inside the test timeout
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402
from worker_common import end_job  # noqa: E402  (this script's folder is on sys.path)

model = AutoModelForCausalLM.from_pretrained(src, distributed_config=DistributedConfig(
    tp_size=tp, fsdp_size=fsdp, dp_replicate_size=dp_replicate, ep_size=ep))
model.save_pretrained(out, distributed_checkpoint=True)
end_job()

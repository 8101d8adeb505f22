"""tpcli's own calls into transformers use its current API: no FutureWarning (deprecated argument) from them.

`tpcli.load_model` of an ordinary checkpoint is `from_pretrained(path, distributed_config=DistributedConfig(...))`;
the older `from_pretrained(path, tp_plan=...)` warns "Passing `tp_plan` directly to from_pretrained is deprecated"
in every worker. The worker below turns FutureWarning into an error around the call, so such a warning fails it.
"""

from __future__ import annotations

import pytest
from conftest import torchrun

WORKER = """
import sys, warnings
import torch.distributed as dist
from torch.distributed.tensor import DTensor
import tpcli

with warnings.catch_warnings():
    warnings.simplefilter("error", FutureWarning)
    model = tpcli.load_model(sys.argv[1])
    model = tpcli.load_model(sys.argv[1], tp_plan={"model.layers.*.mlp.down_proj": "replicate"})
world = dist.get_world_size()
assert model.config.distributed_config.tp_size == world
up = model.model.layers[0].mlp.up_proj.weight
assert isinstance(up, DTensor) and up.to_local().shape[0] * world == up.shape[0], up
down = model.model.layers[0].mlp.down_proj.weight  # the user rule was applied: replicated
assert not isinstance(down, DTensor) or down.to_local().shape == down.shape
print(f"ok {dist.get_rank()}", flush=True)  # one write: both ranks share the stdout of plain torchrun
"""


@pytest.mark.dist
def test_load_model_raises_no_future_warning(model_dirs, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = torchrun(2, script, model_dirs("llama"))
    assert proc.stdout.count("ok ") == 2, proc.stdout

"""torchrun worker for tests/test_plans_library.py: many `verify --numerics` comparisons in one process group.

    torchrun --nproc-per-node=N plans_worker.py CASES.json OUT.json

CASES is a list of {"id", "model", "plan" (NAME, FILE or null: the automatic pick), "load_from" (a sharded
folder or null)}. Each case runs `tpcli.runtime.numerics.compare` (the worker of `verify --numerics`: TP load through
`tpcli.load_model`, forward + greedy decode, errors against the single-process model on rank 0). A case that
raises is recorded with its error, so one broken plan does not hide the others.
"""

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from worker_common import end_job  # noqa: E402  (this script's folder is on sys.path)

from tpcli.runtime.numerics import compare

dist.init_process_group("gloo", timeout=timedelta(seconds=90))
cases = json.loads(Path(sys.argv[1]).read_text())
results = {}
for case in cases:
    try:
        result = compare(case["model"], case.get("plan"), load_from=case.get("load_from"))
    except Exception as exc:  # noqa: BLE001 - reported per case, asserted by the test
        result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    if dist.get_rank() == 0:
        results[case["id"]] = result
    dist.barrier()
if dist.get_rank() == 0:
    Path(sys.argv[2]).write_text(json.dumps(results, indent=1))
end_job()

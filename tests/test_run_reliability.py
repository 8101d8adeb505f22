"""`tpcli run` under stress (issue 23 items 4, 6, 7, 8; usage errors; `run --json`): real torchrun workers on CPU."""

import json
import subprocess
import sys

import pytest
from conftest import base_env

from tpcli.sharding import shard_checkpoint

TPCLI = [sys.executable, "-m", "tpcli"]


def tpcli_run(*args, timeout=240, env=None):
    return subprocess.run([*TPCLI, "run", *map(str, args)], env=env or base_env(), capture_output=True, text=True,
                          timeout=timeout)


OVERWRITE_WORKER = """
import json, os, sys, torch, torch.distributed as dist, tpcli
m = tpcli.load_model()
ids = torch.tensor([[1, 17, 256, 3, 999, 42, 7, 512]])

def logits():
    with torch.no_grad():
        return m(ids).logits

first = logits()
files = sorted(p for p in os.listdir(os.environ["TPCLI_MODEL"]) if p.endswith(".safetensors"))
dist.barrier()
if dist.get_rank() == 0:  # every rank file changed in place, as `cp other/* here/` does: same inode, new bytes
    for name in files:
        path = os.path.join(os.environ["TPCLI_MODEL"], name)
        data = bytearray(open(path, "rb").read())
        start = 8 + int.from_bytes(data[:8], "little")
        data[start:] = bytes(b ^ 0x5A for b in data[start:])
        with open(path, "r+b") as f:
            f.write(data)
dist.barrier()
overwritten = logits()
dist.barrier()
if dist.get_rank() == 0:
    for name in files:
        os.truncate(os.path.join(os.environ["TPCLI_MODEL"], name), 0)
dist.barrier()
truncated = logits()
print("RESULT " + json.dumps({"overwritten": torch.equal(first, overwritten),
                              "truncated": torch.equal(first, truncated)}), flush=True)
"""


@pytest.mark.dist
def test_rank_files_changed_under_a_running_job_do_not_change_its_numbers(model_dirs, tmp_path):
    """Issue 23 item 4: the loaded model's numbers never depend on the files after load_model returned (they did
    when parameters were views of a private mapping of the rank files: new logits after `cp`, SIGBUS after
    `truncate`)."""
    folder = tmp_path / "s"
    shard_checkpoint(str(model_dirs("qwen3")), tp=2, out=str(folder))
    script = tmp_path / "w.py"
    script.write_text(OVERWRITE_WORKER)
    proc = tpcli_run("--cpu", 2, "--model", folder, script)
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
    assert proc.returncode == 0 and len(results) == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert all(r == {"overwritten": True, "truncated": True} for r in results), results

"""What several torchrun workers of tests/oracles share (each worker's own folder is on sys.path)."""

import os
import sys

import torch
import torch.distributed as dist
from cache_walk import local


def param_mismatches(ours, theirs) -> list[str]:
    """The parameters of `ours` whose placements or local tensor (torch.equal) differ from `theirs` (transformers'
    own load on the same mesh), plus a line when the parameter names differ."""
    mismatch = []
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        q = theirs_params.get(name)
        if q is None:
            mismatch.append(f"{name}: not in transformers' model")
        elif repr(getattr(p, "placements", None)) != repr(getattr(q, "placements", None)):
            mismatch.append(f"{name}: placements {getattr(p, 'placements', None)} != {getattr(q, 'placements', None)}")
        elif not torch.equal(local(p), local(q)):
            mismatch.append(f"{name}: local tensor differs")
    if set(theirs_params) != {n for n, _ in ours.named_parameters()}:
        mismatch.append("parameter names differ")
    return mismatch


def end_job() -> None:
    """Leave the job: every rank done, the process group destroyed, then exit without interpreter teardown (gloo's
    threads can abort it: "terminate called without an active exception")."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rchar() -> int:
    """Bytes this process has read so far (/proc/self/io `rchar`: every read syscall, page cache or not)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))

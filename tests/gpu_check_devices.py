"""`make gpu-check`'s first step: the GPUs this machine has, and how many the GPU demo uses.

    python tests/gpu_check_devices.py [GPUS]    # the GPUs on stderr; the demo's GPU count on stdout

GPUS given (`make gpu-check GPUS=4`): fails unless that many are visible. Not given: 2 GPUs where there are 2 or
more; on a one-GPU machine 1, with a note that tensor parallelism on GPUs is then not checked at all.
"""

import sys

import torch


def say(line: str) -> None:
    print(f"gpu-check: {line}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    asked = int(argv[0]) if argv and argv[0].strip() else None
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    say(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {n} CUDA GPU(s) visible")
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        say(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    if n == 0:
        sys.exit("gpu-check: no CUDA GPU visible: run it on a GPU machine with a CUDA build of torch "
                 "(pip install torch==2.13.0 from PyPI on Linux is one).")
    if asked is not None and not 1 <= asked <= n:
        sys.exit(f"gpu-check: GPUS={asked} asked for, {n} CUDA GPU(s) visible: run it where {asked} are, or pass "
                 f"GPUS={n}.")
    use = asked or min(2, n)
    if use == 1:
        say("ONE GPU: tensor parallelism on GPUs (nccl, tp >= 2) is NOT checked by this run; the tests that need "
            "2 or 4 GPUs are skipped (listed as SKIPPED below). Run it on a machine with 2+ GPUs for that.")
    print(use)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

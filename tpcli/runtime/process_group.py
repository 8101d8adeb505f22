"""The process group of a worker: its timeout, its device, starting it, and a clean exit.

Used by `tpcli.load_model` (plain torchrun), the worker bootstrap of `tpcli run` and `verify --numerics`.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

from tpcli.adapters.torch_api import accelerator_type
from tpcli.errors import UsageError

MAX_TIMEOUT_S = 10**7  # 115 days
PROCESS_GROUP_TIMEOUT_S = 2 * 3600  # transformers' own (`_ensure_torch_distributed`); see `process_group_timeout`


def process_group_timeout() -> float:
    """Seconds a collective of the job's process group may wait: TPCLI_TIMEOUT, else 2 hours.

    2 hours is what transformers 5.23 gives the group it creates when none exists (`distributed/utils.py`,
    `_ensure_torch_distributed`: "Sharded loading takes tens of minutes with high rank skew; the default 10-minute
    watchdog is too short"). tpcli creates the group before transformers would (`start_process_group`), so without
    the same value its own `from_pretrained` loads (ordinary checkpoints, DCP folders, meshes, resharding) would
    get a shorter limit than transformers gives them, and a load that works under transformers could time out under
    tpcli. The timeout stays with the group for the whole job, so a rank stuck in a collective is detected only after
    2 hours; a rank that dies is not a hang (torchrun stops the others at once), `tpcli run --timeout` bounds the
    whole job, and TPCLI_TIMEOUT (seconds) sets a shorter group timeout for jobs whose loads are known to be short.
    """
    text = os.environ.get("TPCLI_TIMEOUT")
    if text is None:
        return float(PROCESS_GROUP_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= MAX_TIMEOUT_S:  # beyond it timedelta / torch's milliseconds overflow (1e300: a traceback)
        raise UsageError(f"TPCLI_TIMEOUT={text!r}: expected the process-group timeout in seconds (a number > 0, at "
                         f"most {MAX_TIMEOUT_S:,}), or unset it for the default {PROCESS_GROUP_TIMEOUT_S} s.")
    return seconds


def local_device(accelerator: str | None = None):
    """This process's device: the accelerator at LOCAL_RANK, where transformers' TP load binds a rank, or the CPU.

    `accelerator` is the device type torch finds on this machine (`tpcli.adapters.torch_api.accelerator_type`, what
    transformers asks; "cpu" when no GPU is visible, as under `tpcli run --cpu`, which hides them): passed in only by tests."""
    import torch

    device_type = accelerator or accelerator_type()
    if device_type in ("cpu", "mps"):  # transformers' TP mesh falls back to the CPU on MPS
        return torch.device("cpu")
    return torch.device(device_type, int(os.environ.get("LOCAL_RANK", 0)))


def bind_local_device():
    """Make `local_device()` this process's current device, as transformers does before its TP load, and return it;
    on the CPU, bind nothing. Called by the worker bootstrap before the user's script runs, so that CUDA work done
    before `load_model` (a tensor made with device="cuda", a CUDA graph, NCCL) lands on cuda:LOCAL_RANK, not on
    cuda:0 in every rank; and again by `start_process_group`."""
    device = local_device()
    if device.type != "cpu":
        import torch

        torch.accelerator.set_device_index(device.index)  # GPU jobs only: never runs on a CPU worker
    return device


def start_process_group(timeout_s: float | None = None) -> None:
    """Create the job's process group as transformers would (backend, device binding, `device_id`, timeout: see
    `process_group_timeout`, used when `timeout_s` is None), unless one exists or this is not a distributed job."""
    import torch.distributed as dist

    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return
    # bind before init, as transformers does: each rank's NCCL communicator (and every tensor allocated without an
    # explicit device) then lives on its own GPU, not all on GPU 0
    device = bind_local_device()
    backend = dist.Backend.default_device_backend_map.get(device.type, "gloo")  # cuda: nccl, cpu: gloo
    kwargs = {"device_id": device} if backend == "nccl" else {}
    timeout = timedelta(seconds=process_group_timeout() if timeout_s is None else timeout_s)
    dist.init_process_group(backend, timeout=timeout, **kwargs)
    register_clean_exit()  # the group tpcli made: torn down before the interpreter's own teardown


_EXIT_DRAIN_S = 0.1
_clean_exit_registered = False


def register_clean_exit() -> None:
    """At exit (once per process, after every atexit handler registered later, the user's included): destroy the
    default process group if it is still up, then let the collective backend's worker threads drop what they hold.

    Left to interpreter teardown, a gloo group aborts the process after the script has finished, 1 run in ~25 of
    a tp=2 forward here: a gloo worker thread finishing a collective drops the last reference to a Python tensor
    (DTensor's collectives are asynchronous; a result nobody waited for completes in the background), which needs
    the GIL; once finalization has begun the thread is killed while taking it, and a thread killed inside a C++
    destructor is `std::terminate` ("terminate called without an active exception", SIGABRT; core dump: frames
    `~AsyncAllgatherCoalescedWork` -> `THPVariable_dealloc` -> `take_gil` -> `pthread_exit`). Destroying the
    group does not stop its threads (the model's meshes still hold it), so the handler then sleeps
    `_EXIT_DRAIN_S` with the GIL released, while a finishing thread can still take it. Registered by the worker
    bootstrap before the user's code runs and by `start_process_group`, so it runs also under plain torchrun."""
    global _clean_exit_registered
    if not _clean_exit_registered:
        _clean_exit_registered = True
        atexit.register(_clean_exit)


def _clean_exit() -> None:
    import contextlib
    import sys
    import time

    if "torch.distributed" not in sys.modules:  # no collective ever ran in this process
        return
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    time.sleep(_EXIT_DRAIN_S)

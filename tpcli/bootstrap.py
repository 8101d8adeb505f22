"""Entry point of every worker `tpcli run` starts: runs the user's script or module under torch elastic's
`record`, so an uncaught exception lands in torchrun's error file (tpcli reports it as the root cause), and
records the worker's pid so that `tpcli run` can make sure no worker outlives it.

    python -m tpcli.bootstrap script PATH [ARGS...]
    python -m tpcli.bootstrap module NAME [ARGS...]
"""

import os
import runpy
import signal
import sys


def _die_with_parent() -> None:
    """Linux: get SIGKILL if the torchrun agent dies, so no worker is orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def main() -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    kind, target, *args = sys.argv[1:]
    run_dir = os.environ.get("TPCLI_RUN_DIR")
    if run_dir:
        with open(os.path.join(run_dir, f"pid-{os.environ.get('RANK', '0')}"), "w") as f:
            f.write(str(os.getpid()))
    _die_with_parent()

    @record
    def run() -> None:
        if kind == "module":
            sys.argv = [target, *args]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target, *args]
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")

    run()


if __name__ == "__main__":
    main()

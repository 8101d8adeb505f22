"""Entry point of every worker `tpcli run` starts: runs the user's script or module under torch elastic's
`record`, so an uncaught exception lands in torchrun's error file (tpcli reports it as the root cause), and
records the worker's pid and start time (RUN_DIR/pid-RANK: "PID START", START the kernel's start time of the
process, field 22 of /proc/PID/stat) so that `tpcli run` can make sure no worker outlives it, and time its death,
without ever signalling a process that merely reuses the pid. When the user's code raises (or exits non-zero), the
moment is written to RUN_DIR/failed-PID (ns since the epoch): tpcli orders failures by it, since a rank that fails
because another died fails after it.

`record` writes the error file only for an `Exception`; a `BaseException` that is not one (torch DCP's
CheckpointException, which a failed `dcp.load`/`tpcli.load_state` raises, is one) is written here, with its
traceback, so that the report names it instead of "no Python traceback". SystemExit and KeyboardInterrupt keep
torch's handling (an exit code, no error file).

    python /path/to/tpcli/runtime/bootstrap.py script PATH [ARGS...]
    python /path/to/tpcli/runtime/bootstrap.py module NAME [ARGS...]

It is started by file path, not `-m tpcli.runtime.bootstrap`: `-m` puts the current directory first on sys.path, so a
`tpcli/` folder there (a clone) would shadow the installed package. The installed `tpcli` is imported before the
user's directory is added; then sys.path is what `python SCRIPT` (script's folder first) or `python -m MODULE`
(current directory first) would give.

Under `tpcli run --gpus`, the worker's GPU (cuda:LOCAL_RANK) is made the current device before the user's code
runs (`tpcli.runtime.process_group.bind_local_device`, as transformers binds it for its TP load); under `--cpu` no GPU
is visible and nothing is bound.
"""

import os
import sys

if __name__ == "__main__" and sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # this file's folder (tpcli/): its modules must not be importable as top-level names

import runpy  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402


def _die_with_parent() -> None:
    """Linux: get SIGKILL if the torchrun agent dies, so no worker is orphaned."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the agent died before prctl: nobody would send the signal
        os._exit(1)


def _stamp_failure(run_dir: str | None) -> None:
    if run_dir:
        try:
            with open(os.path.join(run_dir, f"failed-{os.getpid()}"), "w") as f:
                f.write(str(time.time_ns()))
        except OSError:
            pass


def _start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat (clock ticks after boot): with the pid, names one process for good."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "-"  # no procfs: tpcli then never signals the pid (it cannot tell it from a reused one)


def _record_base_exception(exc: BaseException) -> None:
    """The error file `record` writes for an Exception (torch elastic's format, at TORCHELASTIC_ERROR_FILE), for a
    BaseException that is not one; called inside `except`. Written here rather than by torch's
    `ErrorHandler.record_exception`, which fails on an exception whose str() raises."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json
    import traceback

    try:
        text = str(exc)
    except Exception:  # noqa: BLE001
        text = "<exception str() failed>"
    data = {"message": {"message": f"{type(exc).__name__}: {text}",
                        "extraInfo": {"py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except (OSError, TypeError, ValueError):
        pass  # the report then falls back to the exit code; the exception still propagates


def main() -> None:
    _die_with_parent()
    run_dir = os.environ.get("TPCLI_RUN_DIR")
    if run_dir:
        with open(os.path.join(run_dir, f"pid-{os.environ.get('RANK', '0')}"), "w") as f:
            f.write(f"{os.getpid()} {_start_time(os.getpid())}")
    from torch.distributed.elastic.multiprocessing.errors import record

    import tpcli  # noqa: F401  the installed package, cached before the user's folder goes first on sys.path
    from tpcli.runtime.process_group import bind_local_device, register_clean_exit

    register_clean_exit()  # first registered, last run: after the user's own atexit handlers (see its docstring)
    bind_local_device()  # `--gpus`: cuda:LOCAL_RANK is current before the user's code runs (CPU workers: nothing)

    kind, target, *args = sys.argv[1:]

    @record
    def run() -> None:
        sys.argv = [target, *args]
        try:
            if kind == "module":
                sys.path.insert(0, os.getcwd())
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
                runpy.run_path(target, run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (None, 0):
                _stamp_failure(run_dir)
            raise
        except BaseException as exc:
            _stamp_failure(run_dir)
            if not isinstance(exc, (Exception, KeyboardInterrupt)):
                _record_base_exception(exc)
            raise

    try:
        run()
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 - recorded by `record` / _record_base_exception just above
        if not _error_file_written():
            raise  # no error file: Python prints the whole traceback, the report falls back to the exit code
        # The traceback is in the error file; tpcli's failure report prints the root cause's (user frames only), so
        # the rank's own stream says it in one line instead of printing the same traceback a second time.
        try:
            text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        except Exception:  # noqa: BLE001 - an exception whose str() raises
            text = type(exc).__name__
        sys.stderr.write(f"{text}  (traceback: tpcli's failure report, or error.json in this rank's log folder)\n")
        sys.stderr.flush()
        sys.exit(1)


def _error_file_written() -> bool:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    try:
        return bool(path) and os.path.getsize(path) > 0
    except OSError:
        return False


if __name__ == "__main__":
    main()

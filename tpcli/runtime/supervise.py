"""The process between `tpcli run` and torchrun: nothing it started outlives it, even if tpcli is SIGKILLed (Linux).

    python -I /path/to/tpcli/runtime/supervise.py TPCLI_PID RUN_DIR GRACE_S -- torchrun ARGS...

Process tree of a job: tpcli -> supervise.py -> torchrun -> workers -> whatever the workers start. The supervisor
is a child subreaper (PR_SET_CHILD_SUBREAPER): a process of the job whose parent dies is re-parented to it instead of
to PID 1, so every process of the job stays its descendant. It ends the job by killing that subtree:

* tpcli died (any way, SIGKILL included): PR_SET_PDEATHSIG delivers SIGUSR1; everything is SIGKILLed at once and
  RUN_DIR (tpcli's temporary folder) is removed, since nobody is left to report from it;
* SIGTERM/SIGINT/SIGHUP (tpcli stopping the job): forwarded to torchrun as SIGTERM, which stops its workers; what is
  still alive GRACE_S seconds later is SIGKILLed;
* torchrun exited: processes that outlived their worker (`sleep 777 &`) get SIGTERM, then SIGKILL a second later.

It exits with torchrun's exit code (128 + N when a signal N ended torchrun). Started by file path with the standard
library only, in isolated mode (-I: its own folder, tpcli/, is not on sys.path), as tpcli/runtime/bootstrap.py is.
"""

import os
import shutil
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def descendants(root: int) -> list[int]:
    """Every live process below `root`, from /proc (parents before children)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:  # no procfs (not Linux): only torchrun itself is known, and it is waited for
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":  # a zombie is dead already; reaping it is enough
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _reap(child: int, status: dict) -> None:
    """Collect every exited child (orphans re-parented here included); torchrun's status goes into `status`."""
    while True:
        try:
            pid, wstatus = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid == child:
            status["code"] = os.waitstatus_to_exitcode(wstatus)


def kill_tree(child: int, status: dict, grace_s: float = 0.0) -> None:
    """SIGTERM (when grace_s > 0) then SIGKILL every descendant until none is left, reaping them."""
    me = os.getpid()
    if grace_s > 0:
        _signal_all(descendants(me), signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while descendants(me) and time.monotonic() < deadline:
            _reap(child, status)
            time.sleep(0.02)
    while True:
        left = descendants(me)
        if not left:
            break
        _signal_all(left, signal.SIGKILL)  # a process forking meanwhile: its child is re-parented here, next round
        time.sleep(0.01)
        _reap(child, status)
    _reap(child, status)


def main(argv: list[str]) -> int:
    tpcli_pid, run_dir, grace_s = int(argv[0]), argv[1], float(argv[2])
    cmd = argv[argv.index("--") + 1:]
    orphaned: list[bool] = []
    stop_at: list[float] = []
    signal.signal(signal.SIGUSR1, lambda *_: orphaned.append(True))
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGUSR1)
    child = os.fork()
    if child == 0:  # torchrun: SIGKILLed by the kernel if this supervisor dies (even by SIGKILL)
        try:
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            os.execv(cmd[0], cmd)
        finally:
            os._exit(127)

    def stop(signum, frame) -> None:
        if not stop_at:
            stop_at.append(time.monotonic() + grace_s)
            _signal_all([child], signal.SIGTERM)  # torchrun's agent then stops its workers

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, stop)
    if os.getppid() != tpcli_pid:  # tpcli died before PR_SET_PDEATHSIG was set: nobody would send it
        orphaned.append(True)
    status: dict = {}
    while "code" not in status and not orphaned:
        if stop_at and time.monotonic() > stop_at[0]:
            break  # torchrun did not stop within the grace period
        _reap(child, status)
        time.sleep(0.02)
    if orphaned:
        kill_tree(child, status)
        shutil.rmtree(run_dir, ignore_errors=True)
        return 1
    kill_tree(child, status, grace_s=0.0 if stop_at else 1.0)
    code = status.get("code", 128 + signal.SIGKILL)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

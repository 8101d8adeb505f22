"""Watching a running job: its output pumped line by line (each rank's last lines kept), each worker's death timed
(pidfd, to the millisecond), `--timeout`, and the workers that must not outlive `tpcli run`."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tpcli.formats.processes import process_start

if TYPE_CHECKING:
    from tpcli.commands.launch_spec import LaunchSpec

GRACE_S = 10.0  # after Ctrl-C: how long torchrun gets to stop its workers before everything is killed
WORKER_LINE = re.compile(r"^\[(?:n\d+\.)?rank(\d+)\]:")


class DeathWatch(threading.Thread):
    """When each worker of this run died, to the millisecond (pid -> time.time_ns()): a pidfd per worker pid (the
    workers write them to RUN_DIR/pid-RANK as they start), polled until `finish`. A pid whose process does not have
    the recorded start time once its pidfd is open (a reused pid, a rewritten file) is not watched."""

    def __init__(self, run_dir: Path):
        super().__init__(daemon=True)
        self.run_dir = run_dir
        self.deaths: dict[int, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        poller, fds, seen = select.poll(), {}, set()
        while not self.done.is_set():
            for f in self.run_dir.glob("pid-*"):
                worker = read_pid_file(f)
                if worker is None or worker in seen:
                    continue  # being written (next round), malformed, or watched already
                seen.add(worker)
                pid, start = worker
                try:
                    fd = os.pidfd_open(pid)
                except (OSError, AttributeError):  # gone already (or no pidfd): died about now
                    self.deaths.setdefault(pid, time.time_ns())
                    continue
                if process_start(pid) != start:  # the pidfd holds the pid now: this is not the worker
                    os.close(fd)
                    continue
                fds[fd] = pid
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(20):
                self.deaths.setdefault(fds[fd], time.time_ns())
                poller.unregister(fd)
                del fds[fd]
                os.close(fd)
        for fd in fds:
            os.close(fd)

    def finish(self) -> None:
        self.done.set()
        self.join(timeout=5)

    def times(self, run_dir: Path) -> tuple[dict[int, int], set[int]]:
        """pid -> when it failed: the moment its Python code raised (bootstrap's RUN_DIR/failed-PID) or else its
        death; and the set of pids that raised."""
        out, raised = dict(self.deaths), set()
        for f in run_dir.glob("failed-*"):
            try:
                pid, when = int(f.name.removeprefix("failed-")), int(f.read_text())
            except (ValueError, OSError):
                continue
            out[pid] = min(out.get(pid, when), when)
            raised.add(pid)
        return out, raised


def running_ranks(run_dir: Path) -> list[int]:
    """Global ranks whose worker process is still alive (their pids are in run_dir/pid-RANK)."""
    running = []
    for f in run_dir.glob("pid-*"):
        worker, rank = read_pid_file(f), f.name.removeprefix("pid-")
        if worker is not None and rank.isascii() and rank.isdigit() and len(rank) < 10 and is_worker(*worker, run_dir):
            running.append(int(rank))
    return sorted(running)


PID_FILE = re.compile(r"([0-9]{1,10}) ([0-9]{1,20})")  # "PID START", as tpcli/runtime/bootstrap.py writes it


def read_pid_file(f: Path) -> tuple[int, str] | None:
    """(pid, kernel start time) from a worker's RUN_DIR/pid-RANK; None for anything else (a bare pid as older
    tpcli wrote, a file being written, garbage, a file too big to be one)."""
    try:
        with open(f, "rb") as fh:
            text = fh.read(64).decode("ascii")
    except (OSError, UnicodeDecodeError):
        return None
    m = PID_FILE.fullmatch(text)
    return (int(m.group(1)), m.group(2)) if m and 0 < int(m.group(1)) < 2**22 else None


ENVIRON_MAX = 1 << 22  # bytes of /proc/PID/environ read: far beyond any real environment


def is_worker(pid: int, start: str, run_dir: Path) -> bool:
    """Is `pid` alive and a worker of this run: the kernel's start time is the one recorded, and its environment
    (as it was started) carries TPCLI_RUN_DIR=run_dir. A pid file names any process its writer likes (the user's
    script can rewrite it; a dead worker's pid is reused): only a process passing both checks is ever signalled."""
    if process_start(pid) != start:
        return False
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            environ = fh.read(ENVIRON_MAX)
    except OSError:
        return False
    return f"TPCLI_RUN_DIR={run_dir}".encode() in environ.split(b"\0")


def timeout_report(spec: LaunchSpec, running: list[int], last: dict[str, deque]) -> list[str]:
    lines = [f"tpcli run: --timeout {spec.timeout_s:g}s expired; stopped all {spec.nproc} local workers; "
             f"still running then: {', '.join(f'rank {r}' for r in running) or 'none'}"]
    for r in running:
        local = str(r - spec.node_rank * spec.nproc)
        tail = list(last.get(local, []))
        lines.append(f"  rank {r} last output: " + ("(none)" if not tail else ""))
        lines += ["    " + ln for ln in tail]
    return lines


# torchrun's own log lines about the workers it stops and the error files it copies ("E1205 12:00:00.1 123
# torch/distributed/elastic/multiprocessing/errors/error_handler.py:145] no error file defined ...", "W1205 ...
# Sending process 42 closing signal SIGTERM", "Received 15 death signal, shutting down workers"): tpcli reports
# the same facts in its own words (failure_report, wait_job), so these are kept for it but not shown.
ELASTIC_NOISE = re.compile(r"^[IWE]\d{4} [\d:.]+ +\d+ \S*torch/distributed/elastic/"
                           r"(?:multiprocessing/|agent/server/api\.py:\d+\] Received \S+ death signal)")


def pump_output(stream, sink, agent_lines: list[str] | None, last: dict[str, deque]) -> None:
    """Forward worker lines ("[rank0]:...") as they come; keep torchrun's own failure dump out of the way.

    It always reads to the end: if the reader of our output goes away (`| head`), the rest is dropped, so torchrun
    never blocks on a full pipe."""
    in_dump = False
    for line in stream:
        prefix = WORKER_LINE.match(line)
        is_worker = prefix is not None
        if is_worker and line[prefix.end():].startswith(prefix.group(0)):
            line = line[prefix.end():]  # torch prefixes its own "[rankN]:" once a process group exists
        if is_worker:
            last.setdefault(prefix.group(1), deque(maxlen=3)).append(line.rstrip("\n"))
        if agent_lines is not None and not is_worker:
            agent_lines.append(line.rstrip("\n"))
            if line.startswith("Traceback (most recent call last)") or in_dump:
                in_dump = True  # torchrun's ChildFailedError trace; tpcli prints its own summary instead
                continue
            if ELASTIC_NOISE.match(line):
                continue
        if sink is not None:
            try:
                sink.write(line)
                sink.flush()
            except (BrokenPipeError, ValueError):
                sink = None


def wait_job(proc: subprocess.Popen, report: Callable[[str], None], timeout_s: float | None = None,
          on_timeout: Callable[[], object] = lambda: None):
    """Wait for torchrun; on SIGINT/SIGTERM/SIGHUP or when `timeout_s` expires stop it (and its workers).

    Returns None when torchrun ended by itself, the signal number when interrupted, "timeout" on timeout."""
    stopped: list = []

    def stop(why) -> None:
        if not stopped:
            stopped.append(why)
            report("tpcli run: stopping workers…")
            try:
                proc.send_signal(signal.SIGTERM)  # torchrun's agent then terminates every worker
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, lambda signum, frame: stop(signum))
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        expires = time.monotonic() + timeout_s if timeout_s else None
        deadline = None
        while proc.poll() is None:
            if expires is not None and time.monotonic() > expires and not stopped:
                on_timeout()
                stop("timeout")
            if stopped and deadline is None:  # the supervisor kills the job after GRACE_S; this is the backstop
                deadline = time.monotonic() + GRACE_S + 5
            if deadline is not None and time.monotonic() > deadline:
                _killpg(proc.pid)
            time.sleep(0.05)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return stopped[0] if stopped else None


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_leftovers(run_dir: Path) -> None:
    """Workers run in their own sessions; make sure none outlives `tpcli run`. Only a process that `is_worker` of
    this run is killed, through a pidfd opened before the check (the pid cannot be reused in between)."""
    for f in run_dir.glob("pid-*"):
        worker = read_pid_file(f)
        if worker is None:
            continue
        try:
            fd = os.pidfd_open(worker[0])
        except (OSError, AttributeError):
            continue  # gone (or no pidfd: the supervisor has killed the job's whole tree already)
        try:
            if not is_worker(*worker, run_dir):
                continue
            time.sleep(0.5)
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        finally:
            os.close(fd)

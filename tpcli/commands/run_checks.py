"""`tpcli run`'s usage errors, found before anything is spawned, allocated or created: exit 2, one line naming the
flag (or the environment variable, in a SLURM allocation) that gave the bad value, and the fix.

Sizes are bounded before anything is built from them:

    workers per node   1 <= --gpus/--cpu <= MAX_NPROC      (1,024: beyond any node's GPUs or useful CPU workers)
    nodes              1 <= --nnodes <= MAX_NNODES         (100,000: beyond any cluster torchrun rendezvous serves)
    world              --gpus/--cpu x --nnodes <= MAX_WORLD (2**20 ranks)
    node rank          0 <= --node-rank < --nnodes         (torchrun would wait in the rendezvous for ever)
    port               1 <= PORT <= 65535                  (--rdzv-endpoint HOST:PORT, MASTER_PORT)

`-m MODULE` is looked up as the workers' `python -m` would (current directory first on sys.path) without running it:
`importlib.util.find_spec` imports the parent packages of a dotted name, never the module itself.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tpcli.errors import UsageError

if TYPE_CHECKING:
    from tpcli.commands.launch_spec import LaunchSpec

MAX_NPROC = 1024
MAX_NNODES = 100_000
MAX_WORLD = 2**20
MAX_PORT = 65535
TEE = re.compile(r"^[0-3]$|^[0-9]{1,7}:[0-3](,[0-9]{1,7}:[0-3])*$")
LOCAL_RANKS = re.compile(r"[0-9]{1,7}(,[0-9]{1,7})*")


def shown(source: str, value) -> str:
    """'--nnodes 4' for a flag, 'SLURM_NNODES=4' for an environment variable; a huge number by its digit count."""
    text = str(value)
    if len(text) > 20:
        text = f"<a {len(text)}-digit number>"
    return f"{source} {text}" if source.startswith("-") else f"{source}={text}"


def check_count(source: str, value: int | None, most: int, *, what: str, fix: str = "") -> None:
    """1 <= value <= most, or a UsageError naming `source` (a flag or an environment variable)."""
    if value is None:
        return
    if value < 1:
        raise UsageError(f"{shown(source, value)}: must be at least 1{fix}.")
    if value > most:
        raise UsageError(f"{shown(source, value)}: at most {most:,} {what}{fix}.")


def check_sizes(*, nproc: int, nnodes: int, node_rank: int, names: dict[str, str] | None = None) -> None:
    """Workers per node, nodes, world size and node rank in range; `names` tells which flag or environment variable
    gave each value ("nproc", "nnodes", "node_rank"; default: the flags)."""
    names = {"nproc": "--cpu/--gpus", "nnodes": "--nnodes", "node_rank": "--node-rank", **(names or {})}
    check_count(names["nproc"], nproc, MAX_NPROC, what="workers per node")
    check_count(names["nnodes"], nnodes, MAX_NNODES, what="nodes")
    if nproc * nnodes > MAX_WORLD:
        raise UsageError(f"{shown(names['nproc'], nproc)} x {shown(names['nnodes'], nnodes)} = "
                         f"{nproc * nnodes:,} ranks: at most {MAX_WORLD:,}.")
    check_node_rank(node_rank, nnodes, names)


def check_node_rank(node_rank: int, nnodes: int | None, names: dict[str, str]) -> None:
    """0 <= node_rank < nnodes (torchrun waits in the rendezvous for ever otherwise)."""
    nnodes = 1 if nnodes is None else nnodes
    if not 0 <= node_rank < nnodes:
        raise UsageError(f"{shown(names['node_rank'], node_rank)}: must be 0 to {nnodes - 1} "
                         f"({shown(names['nnodes'], nnodes)}); each node of the job has its own rank.")


def check_port(given: str, port: str) -> int:
    """A TCP port 1..65535 (its text), or a UsageError naming `given` (the flag or variable with its value)."""
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= MAX_PORT:
        raise UsageError(f"{given}: the port must be a number from 1 to {MAX_PORT}.")
    return int(port)


def check_module(name: str) -> None:
    """`-m NAME` names a module (or a package with __main__) the workers can import from the current directory;
    else a UsageError. The module itself is not imported (it may do anything at import); its parent packages are,
    as `python -m` does, and one that fails to import counts as missing."""
    import importlib.machinery
    import importlib.util

    if len(name) > 1000 or not all(part.isidentifier() for part in name.split(".")):
        raise UsageError(f"-m {name!r}: not a module name (dotted Python identifiers, e.g. tpcli.examples.generate).")
    cwd = os.getcwd()
    sys.path.insert(0, cwd)  # the workers' sys.path (tpcli/runtime/bootstrap.py puts the current directory first)
    try:
        spec = importlib.util.find_spec(name)
        main = spec is not None and spec.submodule_search_locations is not None and \
            importlib.machinery.PathFinder.find_spec(f"{name}.__main__", list(spec.submodule_search_locations))
    except ModuleNotFoundError as exc:  # a parent package missing
        raise UsageError(f"-m {name}: no such module ({_first_line(exc)}; looked up from {cwd} and the Python path); "
                         "check the name, or give a SCRIPT.py path.") from None
    except Exception as exc:  # noqa: BLE001  a parent package that fails to import: the module cannot run
        raise UsageError(f"-m {name}: cannot be imported ({type(exc).__name__}: {_first_line(exc)}); check the name "
                         f"and that it is importable from {cwd}.") from None
    finally:
        if sys.path and sys.path[0] == cwd:
            del sys.path[0]
    if spec is None:
        raise UsageError(f"-m {name}: no such module (looked up from {cwd} and the Python path); check the name, "
                         "or give a SCRIPT.py path.")
    if spec.submodule_search_locations is not None and not main:
        raise UsageError(f"-m {name}: a package without __main__.py, so it cannot be run; name one of its modules.")


def _first_line(exc: BaseException) -> str:
    try:
        return (str(exc).strip().splitlines() or [""])[0][:200]
    except Exception:  # noqa: BLE001
        return "?"


def validate(spec: LaunchSpec) -> None:
    """Usage errors found before anything starts (torchrun would raise them as a traceback, after tpcli made its
    folders): exit 2, one line naming the flag and the fix."""
    check_sizes(nproc=spec.nproc, nnodes=spec.nnodes, node_rank=spec.node_rank,
                names={"nproc": "--gpus" if spec.gpus else "--cpu"})
    if spec.max_restarts < 0:
        raise UsageError(f"--max-restarts {spec.max_restarts}: must be >= 0 (0: no restart).")
    if spec.tee is not None and not TEE.match(spec.tee):
        raise UsageError(f"--tee {spec.tee}: expected 0 (none), 1 (stdout), 2 (stderr) or 3 (both), or per local "
                         "rank as 0:3,1:1.")
    if spec.ranks_filter is not None:
        text = spec.ranks_filter.replace(" ", "")
        if not LOCAL_RANKS.fullmatch(text) or any(int(r) >= spec.nproc for r in text.split(",")):
            raise UsageError(f"--ranks-filter {spec.ranks_filter}: expected local ranks below {spec.nproc}, "
                             "comma-separated (e.g. 0 or 0,1).")
    if spec.nnodes > 1:
        endpoint = spec.rdzv_endpoint or ""
        host, _, port = endpoint.rpartition(":")
        if not host:
            raise UsageError(f"--rdzv-endpoint {endpoint}: expected HOST:PORT.")
        check_port(f"--rdzv-endpoint {endpoint}", port)
    if spec.log_dir is not None:
        check_log_dir(Path(spec.log_dir).expanduser())
    if spec.script and not Path(spec.script).is_file():
        raise UsageError(f"SCRIPT {spec.script}: no such file.")
    if spec.module:
        check_module(spec.module)


def check_log_dir(path: Path) -> None:
    """--log-dir must be a folder we can write, or a path whose first existing ancestor is one (it is created)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == path else f"is under {probe}, a file"
        raise UsageError(f"--log-dir {path}: {what}, not a folder; give a folder (it is created if missing).")
    if not probe.exists() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--log-dir {path}: {probe} is not writable; give a folder you can write.")

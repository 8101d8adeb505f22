"""`tpcli run` inside a SLURM allocation: the node flags derived from SLURM's environment.

Inside an allocation (`SLURM_JOB_ID` set), with one `tpcli run` per node (`srun --ntasks-per-node=1 tpcli run ...`):

    --nnodes         SLURM_JOB_NUM_NODES (or SLURM_NNODES)
    --node-rank      SLURM_NODEID
    --rdzv-endpoint  the first host of SLURM_JOB_NODELIST (`scontrol show hostnames` when present, else parsed
                     here: `node[07-08,10],gpu3` -> node07 node08 node10 gpu3), port MASTER_PORT or 29500
    --rdzv-id        SLURM_JOB_ID
    --gpus           SLURM_GPUS_ON_NODE (or a count in SLURM_GPUS_PER_NODE, `h100:4` -> 4)

A flag given explicitly wins over what SLURM says. A value taken from SLURM is checked as the flag would be
(`tpcli.commands.run_checks`), and a bad one is named by its variable (`SLURM_NODEID=9: must be 0 to 1`), never by a
flag the user did not give. The first host is needed only on several nodes with no --rdzv-endpoint: only then is it
computed, from the list's first entry without expanding the rest (`node[0-9999999]` is 10 million names), or by
`scontrol` under a SCONTROL_TIMEOUT_S limit, reading its first line only.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from functools import cached_property

from tpcli.commands.run_checks import MAX_NNODES, MAX_NPROC, check_count, check_node_rank, check_port
from tpcli.errors import UsageError

DEFAULT_PORT = 29500
SCONTROL_TIMEOUT_S = 5.0
MAX_HOSTS = MAX_NNODES  # names one expanded list may hold
Group = list[tuple[str, int, int]]  # a bracket's ranges: (lower bound as written, lower, upper)


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names, in order: 'a[07-08,10],b1' -> ['a07', 'a08', 'a10', 'b1'].

    Ranges keep their zero padding (width of the lower bound); several bracket groups in one name multiply
    ('r[1-2]n[3-4]' -> r1n3 r1n4 r2n3 r2n4). A malformed list, or one of more than MAX_HOSTS names (counted before
    any is made), is a UsageError naming it."""
    items = [_parse_item(item, nodelist) for item in _split_top(nodelist, nodelist)]
    count = sum(math.prod(_size(g) for g in parts if not isinstance(g, str)) for parts in items)
    if count > MAX_HOSTS:
        raise UsageError(f"SLURM_JOB_NODELIST={_short(nodelist)}: {count:,} hosts, more than the {MAX_HOSTS:,} a job "
                         "can have.")
    hosts: list[str] = []
    for parts in items:
        choices = [[g] if isinstance(g, str) else [str(n).zfill(len(lo)) for lo, a, b in g for n in range(a, b + 1)]
                   for g in parts]
        hosts += ["".join(c) for c in itertools.product(*choices)]
    return hosts


def parsed_first_host(nodelist: str) -> str:
    """The first name `expand_nodelist` would give, without expanding anything: the first entry with each bracket's
    first lower bound. The whole list is still checked."""
    first = [_parse_item(item, nodelist) for item in _split_top(nodelist, nodelist)][0]
    return "".join(g if isinstance(g, str) else g[0][0] for g in first)


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _split_top(text: str, whole: str) -> list[str]:
    """Split at commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        if depth not in (0, 1):
            raise UsageError(f"SLURM_JOB_NODELIST={_short(whole)}: unbalanced brackets.")
        if c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise UsageError(f"SLURM_JOB_NODELIST={_short(whole)}: unbalanced brackets.")
    items.append(text[start:])
    if any(not s.strip() for s in items):
        raise UsageError(f"SLURM_JOB_NODELIST={_short(whole)}: an empty host name.")
    return [s.strip() for s in items]


def _parse_item(item: str, whole: str) -> list[str | Group]:
    """'r[1-2]n[03-04]x' -> ['r', [('1', 1, 2)], 'n', [('03', 3, 4)], 'x']: literals and bracket groups."""
    parts: list[str | Group] = []
    pos = 0
    for m in re.finditer(r"\[([^\[\]]*)\]", item):
        parts += [item[pos:m.start()], _parse_group(m.group(1), item, whole)]
        pos = m.end()
    parts.append(item[pos:])
    if any(isinstance(p, str) and ("[" in p or "]" in p) for p in parts):
        raise UsageError(f"SLURM_JOB_NODELIST={_short(whole)}: cannot read {_short(item)}.")
    return parts


def _parse_group(ranges: str, item: str, whole: str) -> Group:
    group: Group = []
    for part in ranges.split(","):
        r = re.fullmatch(r"([0-9]{1,18})(?:-([0-9]{1,18}))?", part.strip())
        if r is None or (r.group(2) is not None and int(r.group(2)) < int(r.group(1))):
            raise UsageError(f"SLURM_JOB_NODELIST={_short(whole)}: cannot read the range {_short(part)} in "
                             f"{_short(item)}.")
        group.append((r.group(1), int(r.group(1)), int(r.group(2) or r.group(1))))
    return group


def _size(group: Group) -> int:
    return sum(b - a + 1 for _, a, b in group)


def first_host(nodelist: str) -> str:
    """The first host of the allocation: the first line of `scontrol show hostnames` when scontrol is installed and
    answers within SCONTROL_TIMEOUT_S, else `parsed_first_host`."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        line = _first_line([scontrol, "show", "hostnames", nodelist], SCONTROL_TIMEOUT_S)
        if line:
            return line
    return parsed_first_host(nodelist)


def _first_line(cmd: list[str], timeout_s: float, most: int = 4096) -> str | None:
    """The first word of the first output line of `cmd` (at most `most` bytes read; None if it fails, prints
    nothing, or takes longer than `timeout_s`); the command is killed once that line is read."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    except OSError:
        return None
    data, deadline = b"", time.monotonic() + timeout_s
    try:
        while b"\n" not in data and len(data) < most:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(proc.stdout.fileno(), most - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    if b"\n" not in data and proc.returncode not in (0, -9):
        return None
    words = data.split(b"\n", 1)[0].decode(errors="replace").split()
    return words[0] if words else None


@dataclass
class SlurmNodes:
    """What SLURM says about this node's place in the job; fields are None when SLURM does not say. The
    rendezvous port is MASTER_PORT when set, else 29500. `sources`: which variable gave nnodes, node_rank, gpus."""

    job_id: str
    nnodes: int | None
    node_rank: int | None
    nodelist: str | None
    gpus_per_node: int | None
    master_port: str | None = None
    sources: dict[str, str] = field(default_factory=dict)

    @cached_property
    def host(self) -> str | None:
        """The first host of the allocation: computed on first use only (see `first_host`)."""
        return first_host(self.nodelist) if self.nodelist else None

    @property
    def rdzv_endpoint(self) -> str | None:
        if self.host is None:
            return None
        port = DEFAULT_PORT if self.master_port is None else check_port(
            f"MASTER_PORT={self.master_port[:20]}", self.master_port)
        return f"{self.host}:{port}"


def _int(env: dict, *names: str) -> tuple[int | None, str | None]:
    """(the leading count of the first variable set, its name): SLURM's per-node forms read "4(x2)"."""
    for name in names:
        value = (env.get(name) or "").strip()
        if value:
            m = re.match(r"^([0-9]+)", value)
            if m is None:
                raise UsageError(f"{name}={_short(value)}: expected a number.")
            if len(m.group(1)) > 9:
                raise UsageError(f"{name}={_short(value)}: too large a number.")
            return int(m.group(1)), name
    return None, None


def _gpus(env: dict) -> tuple[int | None, str | None]:
    on_node = _int(env, "SLURM_GPUS_ON_NODE")
    if on_node[0] is not None:
        return on_node
    per_node = (env.get("SLURM_GPUS_PER_NODE") or "").strip()  # "4", "h100:4", "gpu:h100:4"
    m = re.search(r"([0-9]{1,9})$", per_node)
    return (int(m.group(1)), "SLURM_GPUS_PER_NODE") if m else (None, None)


def from_env(env: dict) -> SlurmNodes | None:
    """The allocation's node layout from SLURM's variables, or None outside an allocation. Nothing is computed
    from the host list here (see `SlurmNodes.host`)."""
    job = (env.get("SLURM_JOB_ID") or "").strip()
    if not job:
        return None
    nodelist = (env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "").strip()
    port = (env.get("MASTER_PORT") or "").strip()
    (nnodes, nnodes_var), (rank, rank_var), (gpus, gpus_var) = (
        _int(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES"), _int(env, "SLURM_NODEID"), _gpus(env))
    sources = {k: v for k, v in (("nnodes", nnodes_var), ("node_rank", rank_var), ("gpus", gpus_var)) if v}
    return SlurmNodes(job_id=job, nnodes=nnodes, node_rank=rank, nodelist=nodelist or None, gpus_per_node=gpus,
                      master_port=port or None, sources=sources)


def apply(slurm: SlurmNodes, *, gpus, cpu, nnodes, node_rank, rdzv_endpoint, rdzv_id,
          sources: dict[str, str] | None = None) -> tuple[dict, str]:
    """The launch flags with SLURM's values filling those not given (None), and the line telling what was taken.
    Each value taken is checked first, a bad one named by its variable; `sources` (when given) receives the
    variable each taken value came from (key -> name)."""
    out = {"gpus": gpus, "cpu": cpu, "nnodes": nnodes, "node_rank": node_rank, "rdzv_endpoint": rdzv_endpoint,
           "rdzv_id": rdzv_id}
    taken: list[str] = []
    names = {"nnodes": "--nnodes", "node_rank": "--node-rank", "gpus": "--gpus"}
    given = sources if sources is not None else {}

    def fill(key: str, value, flag: str) -> bool:
        if out[key] is None and value is not None:
            out[key] = value
            taken.append(f"{flag} {value}")
            if key in slurm.sources:
                names[key] = given[key] = slurm.sources[key]
            return True
        return False

    if fill("nnodes", slurm.nnodes, "--nnodes"):
        check_count(names["nnodes"], out["nnodes"], MAX_NNODES, what="nodes")
    if (out["nnodes"] or 1) > 1:
        fill("node_rank", slurm.node_rank, "--node-rank")
        if out["node_rank"] is not None:
            check_node_rank(out["node_rank"], out["nnodes"], names)
        if out["rdzv_endpoint"] is None:  # only now is the first host needed
            fill("rdzv_endpoint", slurm.rdzv_endpoint, "--rdzv-endpoint")
        fill("rdzv_id", slurm.job_id, "--rdzv-id")
    if gpus is None and cpu is None and fill("gpus", slurm.gpus_per_node, "--gpus"):
        if out["gpus"] == 0:
            raise UsageError(f"{names['gpus']}=0: SLURM gives this node no GPU; pass --cpu N for CPU workers (gloo), "
                             "or --gpus N.")
        check_count(names["gpus"], out["gpus"], MAX_NPROC, what="GPUs per node")
    line = (f"tpcli run: SLURM job {slurm.job_id}: " + (", ".join(taken) if taken else "nothing taken")
            + " (from SLURM's environment; flags given explicitly win)")
    return out, line

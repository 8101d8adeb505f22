"""`tpcli run` inside a SLURM allocation: the node flags derived from SLURM's environment.

Inside an allocation (`SLURM_JOB_ID` set), with one `tpcli run` per node (`srun --ntasks-per-node=1 tpcli run ...`):

    --nnodes         SLURM_JOB_NUM_NODES (or SLURM_NNODES)
    --node-rank      SLURM_NODEID
    --rdzv-endpoint  the first host of SLURM_JOB_NODELIST (`scontrol show hostnames` when present, else parsed
                     here: `node[07-08,10],gpu3` -> node07 node08 node10 gpu3), port MASTER_PORT or 29500
    --rdzv-id        SLURM_JOB_ID
    --gpus           SLURM_GPUS_ON_NODE (or a count in SLURM_GPUS_PER_NODE, `h100:4` -> 4)

A flag given explicitly wins over what SLURM says.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from tpcli.errors import UsageError

DEFAULT_PORT = 29500


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names, in order: 'a[07-08,10],b1' -> ['a07', 'a08', 'a10', 'b1'].

    Ranges keep their zero padding (width of the lower bound); several bracket groups in one name multiply
    ('r[1-2]n[3-4]' -> r1n3 r1n4 r2n3 r2n4). A malformed list is a UsageError naming it."""
    hosts: list[str] = []
    for item in _split_top(nodelist, nodelist):
        hosts += _expand_one(item, nodelist)
    return hosts


def _split_top(text: str, whole: str) -> list[str]:
    """Split at commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        if depth not in (0, 1):
            raise UsageError(f"SLURM_JOB_NODELIST={whole!r}: unbalanced brackets.")
        if c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise UsageError(f"SLURM_JOB_NODELIST={whole!r}: unbalanced brackets.")
    items.append(text[start:])
    if any(not s.strip() for s in items):
        raise UsageError(f"SLURM_JOB_NODELIST={whole!r}: an empty host name.")
    return [s.strip() for s in items]


def _expand_one(item: str, whole: str) -> list[str]:
    m = re.match(r"^([^\[\]]*)\[([^\[\]]*)\](.*)$", item)
    if m is None:
        if "[" in item or "]" in item:
            raise UsageError(f"SLURM_JOB_NODELIST={whole!r}: cannot read {item!r}.")
        return [item]
    prefix, ranges, rest = m.groups()
    numbers: list[str] = []
    for part in ranges.split(","):
        r = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if r is None or (r.group(2) is not None and int(r.group(2)) < int(r.group(1))):
            raise UsageError(f"SLURM_JOB_NODELIST={whole!r}: cannot read the range {part!r} in {item!r}.")
        lo, hi = r.group(1), r.group(2) or r.group(1)
        numbers += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return [prefix + n + tail for n in numbers for tail in _expand_one(rest, whole)] if rest else [
        prefix + n for n in numbers]


def first_host(nodelist: str) -> str:
    """The first host of the allocation: `scontrol show hostnames` when it is installed, else `expand_nodelist`."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_nodelist(nodelist)[0]


@dataclass
class SlurmNodes:
    """What SLURM says about this node's place in the job; fields are None when SLURM does not say. The
    rendezvous port is MASTER_PORT when set, else 29500."""

    job_id: str
    nnodes: int | None
    node_rank: int | None
    host: str | None
    gpus_per_node: int | None

    @property
    def rdzv_endpoint(self) -> str | None:
        return None if self.host is None else f"{self.host}:{self._port}"

    _port: int = DEFAULT_PORT


def _int(env: dict, *names: str) -> int | None:
    for name in names:
        value = (env.get(name) or "").strip()
        if value:
            m = re.match(r"^(\d+)", value)  # the leading count (SLURM's per-node forms read "4(x2)")
            if m is None:
                raise UsageError(f"{name}={value!r}: expected a number.")
            return int(m.group(1))
    return None


def _gpus(env: dict) -> int | None:
    on_node = _int(env, "SLURM_GPUS_ON_NODE")
    if on_node is not None:
        return on_node
    per_node = (env.get("SLURM_GPUS_PER_NODE") or "").strip()  # "4", "h100:4", "gpu:h100:4"
    m = re.search(r"(\d+)$", per_node)
    return int(m.group(1)) if m else None


def from_env(env: dict) -> SlurmNodes | None:
    """The allocation's node layout from SLURM's variables, or None outside an allocation."""
    job = (env.get("SLURM_JOB_ID") or "").strip()
    if not job:
        return None
    nodelist = (env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "").strip()
    port = _int(env, "MASTER_PORT") or DEFAULT_PORT
    return SlurmNodes(job_id=job, nnodes=_int(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES"),
                      node_rank=_int(env, "SLURM_NODEID"), host=first_host(nodelist) if nodelist else None,
                      gpus_per_node=_gpus(env), _port=port)


def apply(slurm: SlurmNodes, *, gpus, cpu, nnodes, node_rank, rdzv_endpoint, rdzv_id) -> tuple[dict, str]:
    """The launch flags with SLURM's values filling those not given (None), and the line telling what was taken."""
    out = {"gpus": gpus, "cpu": cpu, "nnodes": nnodes, "node_rank": node_rank, "rdzv_endpoint": rdzv_endpoint,
           "rdzv_id": rdzv_id}
    taken = []

    def fill(key: str, value, flag: str) -> None:
        if out[key] is None and value is not None:
            out[key] = value
            taken.append(f"{flag} {value}")

    fill("nnodes", slurm.nnodes, "--nnodes")
    if (out["nnodes"] or 1) > 1:
        fill("node_rank", slurm.node_rank, "--node-rank")
        fill("rdzv_endpoint", slurm.rdzv_endpoint, "--rdzv-endpoint")
        fill("rdzv_id", slurm.job_id, "--rdzv-id")
    if gpus is None and cpu is None:
        fill("gpus", slurm.gpus_per_node, "--gpus")
    line = (f"tpcli run: SLURM job {slurm.job_id}: " + (", ".join(taken) if taken else "nothing taken")
            + " (from SLURM's environment; flags given explicitly win)")
    return out, line

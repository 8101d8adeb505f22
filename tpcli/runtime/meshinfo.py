"""The mesh a worker runs on: how `tpcli run` tells it (TPCLI_MESH) and how a script finds its coordinates.

`tpcli run --cpu 4 --tp 2 --fsdp 2 SCRIPT` exports to every worker

    TPCLI_MESH=tp=2,fsdp=2,dp_replicate=1,ep=1

(unset without mesh flags: then the mesh is plain TP over the world, tp = WORLD_SIZE, as before).
`tpcli.load_model()` hands it to transformers as `DistributedConfig(tp_size=2, fsdp_size=2, dp_replicate_size=1,
ep_size=1)`; `tpcli.mesh_info()` tells the script where its rank sits, to split prompts or batches:

    info = tpcli.mesh_info()          # or tpcli.mesh_info(model): read from the model's own mesh
    prompts = prompts[info.dp_rank::info.dp_size]

The ranks are laid out as transformers lays them (`initialize_distributed_mesh`, see `tpcli.planning.mesh`):
dense mesh (dp_replicate, fsdp, tp), rank = (r x F + f) x T + t. Data-parallel rank dp_rank = r x F + f, of
dp_size = R x F: ranks with the same dp_rank (the T ranks of one TP group) must see the same inputs; ranks with
different dp_rank see different data (FSDP shards and dp_replicate replicas are both data parallelism).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from tpcli.adapters.transformers_api import mesh_manager_meshes
from tpcli.errors import UsageError
from tpcli.planning.mesh import Mesh

ENV = "TPCLI_MESH"
_DIGITS = re.compile(r"[0-9]{1,9}")  # ASCII: str.isdigit accepts '²', which int() refuses (a traceback)
KEYS = ("tp", "fsdp", "dp_replicate", "ep", "pp")


def format_mesh(mesh: Mesh) -> str:
    """Mesh -> 'tp=2,fsdp=2,dp_replicate=1,ep=1' (the TPCLI_MESH value; ',pp=P' on a pipeline mesh)."""
    return ",".join(f"{k}={getattr(mesh, k)}" for k in KEYS if k != "pp" or mesh.pp > 1)


def parse_mesh(text: str) -> Mesh:
    """'tp=2,fsdp=2' -> Mesh(tp=2, fsdp=2) (missing sizes are 1). A malformed value is a UsageError naming it."""
    sizes: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS or not _DIGITS.fullmatch(value) or int(value) < 1 or key in sizes:
            raise UsageError(f"{ENV}={text!r}: expected sizes as tp=T,fsdp=F,dp_replicate=R,ep=E[,pp=P] (positive integers, "
                             "each at most once).")
        sizes[key] = int(value)
    return Mesh(**sizes)


def mesh_from_env(world: int) -> Mesh:
    """The mesh of this job: TPCLI_MESH when set (it must cover `world` ranks), else plain TP over the world."""
    text = os.environ.get(ENV)
    if not text:
        return Mesh(tp=world)
    mesh = parse_mesh(text)
    if mesh.world != world:
        raise UsageError(f"{ENV}={text}: tp x fsdp x dp_replicate = {mesh.world} ranks, but the job has {world} "
                         "(WORLD_SIZE); launch it with `tpcli run` and the same mesh flags.")
    return mesh


@dataclass(frozen=True)
class MeshInfo:
    """This rank's place on the mesh. `dp_rank`/`dp_size`: which share of the data it takes (TP ranks of one group
    share it). `coords`: its coordinates on transformers' dense and expert meshes."""

    mesh: Mesh
    rank: int
    coords: dict

    @property
    def dp_rank(self) -> int:
        return self.coords["dp_replicate"] * self.mesh.fsdp + self.coords["fsdp"]

    @property
    def dp_size(self) -> int:
        return self.mesh.dp_size

    @property
    def tp_rank(self) -> int:
        return self.coords["tp"]

    def to_dict(self) -> dict:
        return {**self.mesh.to_dict(), "rank": self.rank, "coords": self.coords, "dp_rank": self.dp_rank,
                "dp_size": self.dp_size}


def mesh_info(model=None) -> MeshInfo:
    """Where this rank sits. With `model` (loaded on a mesh by `tpcli.load_model` or transformers), read from its
    own meshes (transformers' mesh manager); otherwise from TPCLI_MESH, RANK and WORLD_SIZE (before loading anything).
    A single process is the 1-rank mesh."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    meshes = mesh_manager_meshes(model) if model is not None else None
    if meshes is None:
        mesh = mesh_from_env(world)
        return MeshInfo(mesh, rank, mesh.coords(rank))
    import torch.distributed as dist

    dense, expert = meshes
    sizes = dict(zip(dense.mesh_dim_names, dense.mesh.shape, strict=True))
    ep = dict(zip(expert.mesh_dim_names, expert.mesh.shape, strict=True))["ep"]
    mesh = Mesh(tp=sizes["tp"], fsdp=sizes["fsdp"], dp_replicate=sizes["dp_replicate"], ep=ep, pp=sizes.get("pp", 1))
    coords = dict(zip(dense.mesh_dim_names, dense.get_coordinate(), strict=True))
    ecoords = dict(zip(expert.mesh_dim_names, expert.get_coordinate(), strict=True))
    coords = {**({"pp": coords["pp"]} if mesh.pp > 1 else {}), "dp_replicate": coords["dp_replicate"],
              "fsdp": coords["fsdp"], "tp": coords["tp"], "efsdp": ecoords["efsdp"], "ep": ecoords["ep"]}
    return MeshInfo(mesh, dist.get_rank() if dist.is_initialized() else rank, coords)


def mesh_config(mesh, tp_plan="auto"):
    """transformers' `DistributedConfig` for `mesh` (a `tpcli.planning.mesh.Mesh`) with `tp_plan`: what
    `from_pretrained(distributed_config=...)` takes instead of the deprecated `tp_plan=` argument. Plain TP is
    `DistributedConfig(tp_size=world, tp_plan=tp_plan)`; the other sizes are passed only when a mesh has them."""
    from transformers import DistributedConfig

    sizes = {"tp_size": mesh.tp}
    if mesh.tp != mesh.world or mesh.ep > 1:
        sizes.update(fsdp_size=mesh.fsdp, dp_replicate_size=mesh.dp_replicate, ep_size=mesh.ep)
    if mesh.pp > 1:
        sizes["pp_size"] = mesh.pp
    return DistributedConfig(**sizes, tp_plan=tp_plan)

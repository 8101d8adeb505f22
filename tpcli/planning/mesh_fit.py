"""Fit over meshes: every valid (pp, tp, fsdp, dp_replicate, ep) of W GPUs, its largest rank, and the best one.

`inspect MODEL --gpus W [--gpus-per-node G] --gpu-mem SIZE` enumerates W = dp_replicate x fsdp x tp with

* tp a valid TP size of the model (`tpcli.planning.checks.valid_tp_sizes`) that divides G: a TP group never spans
  two nodes (its all-reduces run in every layer);
* ep = 1, or for a model with an EP plan every size transformers accepts (a multiple of tp dividing fsdp x tp)
  that splits the experts evenly;
* FSDP (dp_replicate x fsdp > 1) only for a model with an FSDP plan;
* for inference, pipeline stages pp > 1 on every mesh above that transformers accepts with PP (5.23: pp x tp,
  fsdp = dp_replicate = 1; tp x pp loads through `tpcli.load_model` only: `pipeline_meshes`). Its stages
  run one after another (the naive schedule): a pp mesh holds a model no smaller mesh can, at the speed of one
  device, and sends only the hidden states between stages (one point-to-point per stage boundary and step);

each validated and costed by `tpcli.planning.mesh` (the largest rank's total: weights, KV cache, grads, AdamW
and the two labelled estimates). Ranking rule, fitting meshes first (total <= gpu_mem - reserve):

    training : fewest TP ranks, then fewest replicas (FSDP before replicas: FSDP shards the optimizer state over
               more ranks), then most EP ranks (whole experts, no expert all-gather), then the smallest total;
    inference: fewest ranks per model copy (pp x tp x fsdp; the rest are replicas serving on their own), then
               fewest FSDP ranks (FSDP all-gathers every layer's weights at every step; PP sends only the hidden
               states between stages), then fewest PP stages (they run one after another), then most EP ranks,
               then the smallest total;
    not fitting: by total.
"""

from __future__ import annotations

from tpcli.errors import UsageError
from tpcli.planning.memory import MemoryOptions
from tpcli.planning.mesh import Mesh, distributed_config, empty_shard_findings, mesh_memory
from tpcli.planning.plan import ResolvedPlan

RULE = {
    True: "fitting first; fewest TP ranks (inside a node), then FSDP before replicas, then most EP ranks, "
          "then the smallest total",
    False: "fitting first; fewest ranks per model copy (pp x tp x fsdp; the rest are replicas), then fewest FSDP "
           "ranks (FSDP all-gathers the weights at every step, PP sends only hidden states), then fewest PP stages "
           "(transformers' PP runs its stages one after another), then most EP ranks, then the smallest total",
}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_meshes(world: int, per_node: int, valid_tp: list[int]) -> list[Mesh]:
    """Every size combination of `world` ranks with the TP group inside a node (before the model's rules)."""
    out = []
    for tp in _divisors(per_node):
        if tp not in valid_tp or world % tp:
            continue
        for fsdp in _divisors(world // tp):
            dp_replicate = world // (tp * fsdp)
            for ep in _divisors(fsdp * tp):
                if ep == 1 or ep % tp == 0:
                    out.append(Mesh(tp=tp, fsdp=fsdp, dp_replicate=dp_replicate, ep=ep))
    return out


def pipeline_meshes(world: int, per_node: int, valid_tp: list[int]) -> list[Mesh]:
    """The meshes of `world` ranks with pp > 1 stages that transformers' DistributedConfig accepts."""
    out = []
    for pp in _divisors(world)[1:]:
        for m in candidate_meshes(world // pp, per_node, valid_tp):
            mesh = Mesh(tp=m.tp, fsdp=m.fsdp, dp_replicate=m.dp_replicate, ep=m.ep, pp=pp)
            try:
                distributed_config(mesh)
            except UsageError:  # FSDP or replicas with PP (transformers)
                continue
            out.append(mesh)
    return out


def _rank_key(entry: dict, train: bool) -> tuple:
    m = entry
    if train:
        order = (m["tp"], m["dp_replicate"], -m["ep"])
    else:
        order = (m["pp"] * m["tp"] * m["fsdp"], m["fsdp"], m["pp"], -m["ep"])
    return (not m["fits"], *(order if m["fits"] else ()), m["total_bytes"])


def run_flags(mesh: Mesh, per_node: int) -> str:
    """How to launch it: `tpcli run` with the mesh flags; its workers' `tpcli.load_model()` loads on that mesh (a
    script of its own passes the same sizes to transformers)."""
    nodes = mesh.world // per_node if mesh.world > per_node else 1
    gpus = min(per_node, mesh.world)
    flags = f"--gpus {gpus}" + (f" --nnodes {nodes} --node-rank N --rdzv-endpoint HOST:PORT" if nodes > 1 else "")
    flags += f" --tp {mesh.tp}" + "".join(f" --{name} {size}" for name, size in (
        ("fsdp", mesh.fsdp), ("dp-replicate", mesh.dp_replicate), ("ep", mesh.ep), ("pp", mesh.pp)) if size > 1)
    pp = f", pp_size={mesh.pp}" if mesh.pp > 1 else ""
    if mesh.pp > 1 and mesh.tp > 1:  # transformers' own from_pretrained crashes there (mesh.TP_PP_CRASH)
        return f"{flags}  # tpcli.load_model() loads on this mesh (transformers' own tp x pp load crashes in 5.23)"
    return (f"{flags}  # tpcli.load_model() loads on this mesh; or from_pretrained(..., distributed_config="
            f"DistributedConfig(tp_size={mesh.tp}, fsdp_size={mesh.fsdp}, dp_replicate_size={mesh.dp_replicate}, "
            f"ep_size={mesh.ep}{pp}))")


def fit_meshes(plan: ResolvedPlan, opts: MemoryOptions, *, world: int, per_node: int | None, valid_tp: list[int],
               gpu_mem: int, reserve: int) -> dict:
    """`fit.meshes` (ranked) and `fit.best` for W GPUs of `gpu_mem` bytes each."""
    per_node = per_node or world
    if world % per_node:
        raise UsageError(f"--gpus {world} is not a whole number of nodes of --gpus-per-node {per_node}.")
    budget = gpu_mem - reserve
    meshes, skipped = [], 0
    pipelines = [] if opts.train else pipeline_meshes(world, per_node, valid_tp)  # PP is inference only (5.23)
    for mesh in candidate_meshes(world, per_node, valid_tp) + pipelines:
        try:
            doc = mesh_memory(plan, mesh, opts)
        except UsageError:  # the model's own rules: no EP or FSDP plan, experts not divisible by ep
            skipped += 1
            continue
        if empty_shard_findings(plan, mesh):  # a TP/EP shard FSDP would leave empty: transformers' load crashes
            skipped += 1
            continue
        total = doc["ranks"][doc["largest_rank"]]["total_bytes"]
        meshes.append({"pp": mesh.pp, "tp": mesh.tp, "fsdp": mesh.fsdp, "dp_replicate": mesh.dp_replicate, "ep": mesh.ep,
                       "total_bytes": total, "fits": total <= budget, "largest_rank": doc["largest_rank"],
                       "run_flags": run_flags(mesh, per_node)})
    meshes.sort(key=lambda m: _rank_key(m, opts.train))
    best = meshes[0] if meshes and meshes[0]["fits"] else None
    return {"gpus": world, "gpus_per_node": per_node, "rule": RULE[opts.train], "meshes": meshes,
            "refused_by_model": skipped, "best": best}

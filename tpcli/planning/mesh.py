"""N-D meshes: pp x tp x fsdp x dp_replicate x ep, validated as transformers does and costed per rank.

transformers 5.23 (`from_pretrained(..., distributed_config=DistributedConfig(tp_size=T, fsdp_size=F,
dp_replicate_size=R, ep_size=E))`) lays the world W = R x F x T out twice (`initialize_distributed_mesh`):

    dense  mesh (dp_replicate, fsdp, tp):   rank = (r * F + f) * T + t
    expert mesh (dp_replicate, efsdp, ep):  rank = (r * EF + g) * E + e,   EF = efsdp = F * T / E

and places every parameter in two stages (`maybe_distribute_model`):

1. TP (T > 1) as at plain TP: the placement of its style (`tpcli.planning.placements`) over the T ranks of the
   tp dim. With E > 1 the EP plan takes the expert modules instead (their TP rules are dropped): a
   `grouped_gemm` parameter is `Shard(0)` (whole experts) over the E ranks of the ep dim.
2. FSDP2 (R x F > 1): `fully_shard` chunks the stage-1 local tensor along dim 0 over the fsdp dim (F ranks), or,
   for the parameters of an `ep_dispatch_experts` module, over the efsdp dim (EF ranks); dp_replicate ranks hold
   equal copies. FSDP2 cuts with `torch.chunk` (`_chunk_with_empty`), which is `Shard(0)`'s own split, so
   `tpcli.planning.layout.local_shape` gives each stage: local = chunk_F(chunk_T(global)), the
   `(_StridedShard(0, sf=T), Shard(0))` layout DTensor reports. Buffers are not sharded by FSDP.

Per rank, in bytes (d = element size; exact, measured by tests/oracles/mesh_oracle.py):

    weights   = sum over state-dict tensors of d * prod(local shape after both stages)
    grads     = the parameters' local bytes; without FSDP (R x F = 1) an untied `embedding_rowwise` embedding
                keeps its full (vocab, hidden) gradient on every rank, as at plain TP (`tpcli.planning.memory`);
                FSDP redistributes that gradient to the parameter's placement before its reduce-scatter
    optimizer = 2 x the parameters' local bytes (AdamW exp_avg, exp_avg_sq)
    kv cache  = what `tpcli.planning.memory` computes for TP rank t, with B sequences per data-parallel rank
    activations (ESTIMATE) = `tpcli.planning.memory`'s estimate at TP size T, B per data-parallel rank
    fsdp gather (ESTIMATE) = 2 x U (the unit being computed and the next one, prefetched), + U with --train (its
                unsharded gradients before the reduce-scatter); U = the largest FSDP unit's stage-1 bytes on this
                rank, a unit being a module `fully_shard` wraps (decoder layer, embedding, experts, the root)

Pipeline parallelism (P = pp > 1; `tpcli.planning.pipeline`): the world is P x R x F x T, rank =
((p * R + r) * F + f) * T + t, and stage p holds only its tensors (its layers, the embeddings on the first stage,
the norm and head on the last, tied embeddings on both ends) and the KV cache of its layers. transformers 5.23
refuses FSDP or replicas with PP. On tp x pp each stage TP-shards the layers it owns as at plain TP (stage-1
placements, then the stage filter); transformers' own tp x pp load crashes (`TP_PP_CRASH`), `tpcli.load_model`
loads it (`tpcli.runtime.pipeline_tp`), measured equal to these figures. PP is inference only (no loss), so --train
with --pp is refused. The `pp` size and coordinate appear in `to_dict` and
`coords` only on a mesh with pp > 1 (the documents of the other meshes, and the manifests that record them, keep
their keys).

Ranks with the same (t, f, efsdp, e, p) coordinates hold the same bytes, so the table costs at most W groups of
equal tensors, whatever the model size.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from tpcli.adapters.transformers_api import resolve_parallel_plans
from tpcli.errors import ModelError, UsageError
from tpcli.formats.units import dtype_size
from tpcli.planning import pipeline
from tpcli.planning.layout import local_shape
from tpcli.planning.memory import MemoryOptions, keeps_full_gradient, rank_memory
from tpcli.planning.placements import REPLICATE, ParamPlacement, param_placement
from tpcli.planning.plan import ResolvedPlan

SHARD0 = ParamPlacement("shard", 0)
FLAGS = {"tp": "--tp", "fsdp": "--fsdp", "dp_replicate": "--dp-replicate", "ep": "--ep", "pp": "--pp"}
TP_PP_CRASH = ("transformers 5.23's own from_pretrained crashes on tp x pp: apply_tensor_parallelism applies the TP "
               "plan to layers the stage replaced (KeyError, e.g. 'model.embed_tokens.weight'); load it with "
               "tpcli.load_model, which limits the plan to each stage's layers")


@dataclass(frozen=True)
class Mesh:
    tp: int = 1
    fsdp: int = 1
    dp_replicate: int = 1
    ep: int = 1
    pp: int = 1

    @property
    def world(self) -> int:
        return self.pp * self.dp_replicate * self.fsdp * self.tp

    @property
    def efsdp(self) -> int:
        return self.fsdp * self.tp // self.ep

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.fsdp

    def coords(self, rank: int) -> dict[str, int]:
        """Rank -> its coordinates on the dense (pp, dp_replicate, fsdp, tp) and expert (pp, dp_replicate, efsdp,
        ep) meshes ("pp" only when pp > 1)."""
        t, f = rank % self.tp, (rank // self.tp) % self.fsdp
        r, p = (rank // (self.tp * self.fsdp)) % self.dp_replicate, rank // (self.tp * self.fsdp * self.dp_replicate)
        coords = {"dp_replicate": r, "fsdp": f, "tp": t, "efsdp": (rank // self.ep) % self.efsdp,
                  "ep": rank % self.ep}
        return {"pp": p, **coords} if self.pp > 1 else coords

    def to_dict(self) -> dict:
        doc = {"tp": self.tp, "fsdp": self.fsdp, "dp_replicate": self.dp_replicate, "ep": self.ep}
        return {**doc, **({"pp": self.pp} if self.pp > 1 else {}), "world": self.world}


def distributed_config(mesh: Mesh):
    """transformers' own `DistributedConfig` for `mesh`: its `_resolve_parallelism` / `_validate_mesh_config` run
    here (they need no process group). A rule it refuses is a UsageError naming the flag. tp x pp, which it
    accepts but its own `from_pretrained` cannot load (`TP_PP_CRASH`), is planned here and loaded by
    `tpcli.load_model` (`tpcli.runtime.pipeline_tp`)."""
    from transformers import DistributedConfig

    try:
        dc = DistributedConfig(tp_size=mesh.tp, fsdp_size=mesh.fsdp, dp_replicate_size=mesh.dp_replicate,
                               ep_size=mesh.ep, pp_size=mesh.pp)
    except ValueError as exc:
        raise UsageError(_with_flag(str(exc).splitlines()[0], mesh)) from None
    return dc


def _with_flag(message: str, mesh: Mesh, source: str = "transformers' DistributedConfig") -> str:
    """'`ep_size` must be a multiple of `tp_size`.' -> '--ep 3: ... (--tp 2); transformers' DistributedConfig ...'"""
    if mesh.pp > 1 and "pipeline parallelism" in message:  # FSDP / token dispatch with PP: transformers' own words
        others = ", ".join(f"{FLAGS[k]} {getattr(mesh, k)}" for k in ("fsdp", "dp_replicate", "ep")
                           if getattr(mesh, k) > 1)
        return f"--pp {mesh.pp}" + (f" with {others}" if others else "") + f": {message.rstrip('.')} ({source})"
    for key in ("ep", "fsdp", "dp_replicate", "tp"):
        if f"`{key}_size" in message:
            sizes = ", ".join(f"{FLAGS[k]} {getattr(mesh, k)}" for k in FLAGS if k != key and f"{k}_size" in message)
            return (f"{FLAGS[key]} {getattr(mesh, key)}: {message.rstrip('.')}"
                    + (f" ({sizes})" if sizes else "") + f" ({source})")
    return f"mesh {mesh.to_dict()}: {message}"


def _resolved_plans(plan: ResolvedPlan, dc, mesh: Mesh) -> tuple[dict, dict, dict]:
    """transformers' (tp, ep, fsdp) plans for this mesh, expanded per module and parameter
    (`_resolve_parallel_plans`, what `from_pretrained(distributed_config=dc)` applies). They depend only on which of
    tp, ep, dp_replicate x fsdp and pp are above 1, so they are resolved once per model for each of those cases."""
    key = (mesh.tp > 1, mesh.ep > 1, mesh.dp_size > 1, mesh.pp > 1)
    cache = plan.__dict__.setdefault("_mesh_plans", {})
    if key not in cache:
        # transformers' warnings about rules that match nothing are silenced; tpcli reports those itself (checks.py)
        try:
            cache[key] = resolve_parallel_plans(plan.model, dc)
        except ValueError as exc:  # refused before any expansion: cheap to ask again, so not kept
            if mesh.ep > 1 and not getattr(plan.model, "ep_plan", None):  # a dense model: nothing for EP to place
                raise UsageError(f"--ep {mesh.ep}: {type(plan.model).__name__} has no experts to distribute (no "
                                 "expert-parallel plan, `ep_plan`); drop --ep, which applies to MoE models.") from None
            raise UsageError(_with_flag(str(exc).splitlines()[0], mesh, "transformers' plan resolution")) from None
    return cache[key]


@dataclass(frozen=True)
class _Group:
    """State-dict tensors that cost the same on every rank of a mesh."""

    shape: tuple[int, ...]
    dtype: str
    stage: str  # "tp", "ep" or "" (whole after stage 1)
    placement: ParamPlacement  # the stage-1 placement (over T for "tp", over E for "ep")
    fsdp: str  # "fsdp", "efsdp" or "" (buffers; no FSDP)
    is_param: bool
    full_gradient: bool
    stages: frozenset | None = None  # the PP ranks holding it (`tpcli.planning.pipeline`); None: every rank

    def stage1(self, t: int, e: int, mesh: Mesh) -> tuple[int, ...]:
        if self.stage == "tp":
            return local_shape(self.shape, self.placement, mesh.tp, t)
        if self.stage == "ep":
            return local_shape(self.shape, self.placement, mesh.ep, e)
        return self.shape

    def local(self, coords: tuple[int, int, int, int], mesh: Mesh) -> tuple[int, ...]:
        t, f, g, e = coords
        shape = self.stage1(t, e, mesh)
        if self.fsdp and shape:
            n, i = (mesh.fsdp, f) if self.fsdp == "fsdp" else (mesh.efsdp, g)
            shape = local_shape(shape, SHARD0, n, i)
        return shape


def _owners(name: str) -> list[str]:
    """'a.b.c.weight' -> ['a.b.c', 'a.b', 'a']: the modules that contain a parameter, innermost first."""
    parts = name.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


class MeshPlan:
    """The plan resolved by transformers for one mesh, reduced to groups of equal tensors."""

    def __init__(self, plan: ResolvedPlan, mesh: Mesh):
        self.plan, self.mesh = plan, mesh
        dc = distributed_config(mesh)
        if plan.model is None:
            raise ModelError(f"{plan.architecture}: no model skeleton to resolve the mesh plans on.")
        tp_plan, ep_plan, fsdp_plan = _resolved_plans(plan, dc, mesh)
        self.tp_plan, self.ep_plan, self.fsdp_plan = tp_plan, ep_plan, fsdp_plan
        expert_modules = [m for m, s in ep_plan.items() if s == "ep_dispatch_experts"]
        self._check_experts(ep_plan)
        params = plan.__dict__.get("_param_names")
        if params is None:  # the same for every mesh
            params = plan.__dict__["_param_names"] = {n for n, _ in plan.model.named_parameters()}
        tied_targets = {t.tied_to for t in plan.tensors.values() if t.tied_to}
        self.stages = pipeline.stages(plan, mesh.pp) if mesh.pp > 1 else None
        if self.stages is not None:  # a tied tensor lives where any of its names does (embed_tokens and lm_head)
            names: dict[str, list[str]] = {}
            for t in plan.tensors.values():
                names.setdefault(t.tied_to or t.name, []).append(t.name)
        units = set(fsdp_plan) | set(expert_modules) if mesh.dp_size > 1 else set()
        experts = set(expert_modules)
        self.groups: Counter = Counter()
        self.group_of: dict[str, _Group] = {}  # each unique state-dict tensor's group
        self.units: dict[str, Counter] = {}
        for t in plan.unique_tensors:
            is_param = t.name in params
            ep_style = ep_plan.get(t.name)
            if ep_style == "grouped_gemm":
                stage, placement = "ep", SHARD0
            elif ep_style is not None:
                raise ModelError(f"{plan.architecture}: EP style {ep_style!r} on {t.name} is not modelled by tpcli.")
            elif mesh.tp > 1 and t.name in tp_plan:
                stage, placement = "tp", param_placement(tp_plan[t.name], t.name, len(t.shape))
                stage = stage if placement.is_sharded else ""
            else:
                stage, placement = "", REPLICATE
            owners = _owners(t.name)  # enclosing modules, innermost first
            in_experts = any(m in experts for m in owners)
            fsdp = ("efsdp" if in_experts else "fsdp") if is_param and mesh.dp_size > 1 else ""
            full = is_param and mesh.dp_size == 1 and stage == "tp" and keeps_full_gradient(
                tp_plan.get(t.name), t.name in tied_targets)
            held = None if self.stages is None else frozenset().union(*map(self.stages.stages_of, names[t.name]))
            group = _Group(t.shape, t.dtype, stage, placement, fsdp, is_param, full, held)
            self.groups[group] += 1
            self.group_of[t.name] = group
            if fsdp:
                unit = next((u for u in owners if u in units), "")
                self.units.setdefault(unit, Counter())[group] += 1
        # units with the same tensors cost the same: keep one of each kind
        self.unit_kinds = {tuple(sorted(c.items(), key=repr)): u for u, c in self.units.items()}

    def _check_experts(self, ep_plan: dict[str, str]) -> None:
        """`MoEParamShard.shard_param` refuses experts that do not split evenly over the ep ranks (at load)."""
        if self.mesh.ep < 2:
            return
        for name, style in ep_plan.items():
            t = self.plan.tensors.get(name)
            if style == "grouped_gemm" and t is not None and t.shape and t.shape[0] % self.mesh.ep:
                raise UsageError(f"--ep {self.mesh.ep}: {name} has {t.shape[0]} experts, which do not split evenly "
                                 f"over {self.mesh.ep} expert-parallel ranks (transformers' MoEParamShard); "
                                 "pick an --ep that divides the number of experts.")

    def rank_bytes(self, coords: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(weights, grads, parameters, fsdp unit bytes U) for one (t, f, efsdp, e[, p]) coordinate."""
        weights = grads = params = 0
        p, coords = (coords[4] if len(coords) > 4 else 0), coords[:4]
        for g, n in self.groups.items():
            if g.stages is not None and p not in g.stages:  # another pipeline stage's tensor
                continue
            b = n * dtype_size(g.dtype) * math.prod(g.local(coords, self.mesh))
            weights += b
            if g.is_param:
                params += b
                grads += n * dtype_size(g.dtype) * math.prod(g.shape) if g.full_gradient else b
        t, f, ef, e = coords
        unit = 0
        for kind in self.unit_kinds:
            gathered = any((g.fsdp == "fsdp" and self.mesh.fsdp > 1) or (g.fsdp == "efsdp" and self.mesh.efsdp > 1)
                           for g, _ in kind)
            if gathered:
                unit = max(unit, sum(n * dtype_size(g.dtype) * math.prod(g.stage1(t, e, self.mesh)) for g, n in kind))
        return weights, grads, params, unit


def mesh_plan(plan: ResolvedPlan, mesh: Mesh) -> MeshPlan:
    """MeshPlan(plan, mesh), built once per mesh and kept on the plan (a mesh table asks for it several times)."""
    cache = plan.__dict__.setdefault("_mesh_plan_objects", {})
    if mesh not in cache:
        cache[mesh] = MeshPlan(plan, mesh)
    return cache[mesh]


def empty_shard_findings(plan: ResolvedPlan, mesh: Mesh) -> list:
    """Parameters that a TP or EP shard leaves too short for FSDP: some rank's local tensor after both stages is
    empty along dim 0 (e.g. vocab 3 at --tp 2 --fsdp 2: chunks 2 and 1, then 1 and 0). transformers' loader then
    crashes on that rank (IndexError in `sharding_utils._slice_and_cat`, or a failed weight conversion for experts)
    while its peers wait in FSDP's all-gather. FSDP alone (no stage-1 shard) loads empty chunks fine (measured by
    tests/test_verify_sweep.py)."""
    from tpcli.planning.checks import Finding

    if mesh.dp_size < 2 or (mesh.tp < 2 and mesh.ep < 2):
        return []
    mp = mesh_plan(plan, mesh)
    out = []
    for g in mp.groups:
        if not (g.stage and g.fsdp):
            continue
        for rank in range(mesh.world):
            c = mesh.coords(rank)
            coords = (c["tp"], c["fsdp"], c["efsdp"], c["ep"])
            first, whole = g.local(coords, mesh), g.stage1(coords[0], coords[3], mesh)
            if first and first[0] == 0 and whole[0] > 0:
                name = next(t.name for t in plan.unique_tensors if t.shape == g.shape and t.dtype == g.dtype)
                dim = "--fsdp" if g.fsdp == "fsdp" else "the efsdp size (--fsdp x --tp / --ep)"
                out.append(Finding("error", "mesh-empty-shard", (
                    f"{name} {tuple(g.shape)}: its {g.stage.upper()} shard on rank {rank} has "
                    f"{whole[0]} rows, fewer than {dim} = "
                    f"{mesh.fsdp if g.fsdp == 'fsdp' else mesh.efsdp}; transformers' loader crashes on the ranks "
                    "left empty; use a smaller --fsdp or --tp/--ep"), name))
                break
    return out


def mesh_findings(plan: ResolvedPlan, mesh: Mesh, findings: list, as_dicts: bool = False) -> list:
    """tpcli's per-TP findings (`checks.check_plan` at T, as objects, or dicts with `as_dicts`) that still apply on
    `mesh`: with E > 1 transformers drops the experts' TP rules for the EP plan (whole experts per rank), so
    findings about the experts' TP shards (e.g. grouped_mm strides of a split intermediate size) do not apply and
    are dropped. The mesh's own findings (`empty_shard_findings`, `pipeline.stage_findings`) are added."""
    extra = empty_shard_findings(plan, mesh) + (pipeline.stage_findings(plan, mesh.pp) if mesh.pp > 1 else [])
    if as_dicts:
        extra = [f.to_dict() for f in extra]
    if mesh.ep < 2:
        return findings + extra
    ep_plan = mesh_plan(plan, mesh).ep_plan
    experts = set(ep_plan)  # the EP plan's parameters and modules
    from tpcli.planning.checks import wildcard_name

    ep_blocks = {wildcard_name(m).rsplit(".", 1)[0]: s for m, s in ep_plan.items() if s == "ep_dispatch_experts"}

    def field(f, key):
        return f.get(key) if isinstance(f, dict) else getattr(f, key)

    def reworded(f):
        """A pairing error about a block whose experts the EP plan dispatches: the TP advice (rowwise/colwise
        partners) does not apply there; what does is that the router must stay whole."""
        t = field(f, "target")
        block = t.rsplit(".", 1)[0] if t and "." in t else None
        if field(f, "code") != "pairing" or block not in ep_blocks:
            return f
        text = (f"{block}: {t.rsplit('.', 1)[1]}: {plan.rules.get(t, 'split')} splits its output across the TP ranks, "
                f"but on --ep {mesh.ep} the block's experts are transformers' EP plan ({ep_blocks[block]}), which "
                "routes each token on every expert's score: keep the router whole (drop the rule for "
                f"{t})")
        return {**f, "message": text} if isinstance(f, dict) else type(f)(f.severity, f.code, text, t)

    return [reworded(f) for f in findings
            if not (field(f, "target") and (field(f, "target") in experts
                                            or any(o in experts for o in _owners(field(f, "target")))))] + extra


def mesh_memory(plan: ResolvedPlan, mesh: Mesh, opts: MemoryOptions) -> dict:
    """The `mesh` document of `inspect --json`: sizes, and every rank with its coordinates and bytes; on a pp mesh
    also `stages` (each stage's layers [start, stop), and whether it holds the embeddings and the head)."""
    if opts.train and mesh.pp > 1:
        raise UsageError(f"--train with --pp {mesh.pp}: transformers 5.23's pipeline parallelism is inference only "
                         "(its PP forward returns no loss and has no backward schedule); plan training with --tp/--fsdp.")
    mp = mesh_plan(plan, mesh)
    cache_tp = plan.__dict__.setdefault("_mesh_tp_memory", {})
    per_stage = {}
    for p in range(mesh.pp):  # KV cache and the activation estimate per TP rank, once per TP size and stage layers
        layers = mp.stages.layers(p) if mp.stages is not None else None
        if (mesh.tp, opts, layers) not in cache_tp:
            cache_tp[(mesh.tp, opts, layers)] = rank_memory(plan, mesh.tp, opts, layers=layers)
        per_stage[p] = cache_tp[(mesh.tp, opts, layers)]
    cache: dict[tuple, tuple] = {}
    ranks = []
    for rank in range(mesh.world):
        c = mesh.coords(rank)
        key = (c["tp"], c["fsdp"], c["efsdp"], c["ep"], c.get("pp", 0))
        if key not in cache:
            cache[key] = mp.rank_bytes(key)
        weights, grads, params, unit = cache[key]
        tp_rank = per_stage[c.get("pp", 0)][c["tp"]]
        gather = (2 + opts.train) * unit
        row = {
            "rank": rank,
            "coords": c,
            "weight_bytes": weights,
            "kv_cache_bytes": tp_rank.kv_cache_bytes,
            "kv_cache_visible_bytes": tp_rank.kv_cache_visible_bytes,
            "grad_bytes": grads if opts.train else 0,
            "optimizer_bytes": 2 * params if opts.train else 0,
            "activation_bytes_estimate": tp_rank.activation_bytes_estimate,
            "fsdp_gather_bytes_estimate": gather,
        }
        row["total_bytes"] = sum(row[k] for k in ("weight_bytes", "kv_cache_bytes", "grad_bytes", "optimizer_bytes",
                                                  "activation_bytes_estimate", "fsdp_gather_bytes_estimate"))
        ranks.append(row)
    largest = max(ranks, key=lambda r: r["total_bytes"])
    stages = {"stages": mp.stages.describe()} if mp.stages is not None else {}
    return {**mesh.to_dict(), "efsdp": mesh.efsdp, **stages, "ranks": ranks, "largest_rank": largest["rank"]}

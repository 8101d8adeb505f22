"""Which mesh wrote a transformers DCP save: inferred from its chunk layout, as the save does not record it.

`save_pretrained(dir, distributed_checkpoint=True)` drops `distributed_config` from config.json, so a folder saved
on tp=2 x fsdp=2 holds only W = 4 rank files (`shard-0000R-model-...`) and each tensor's chunks (offsets and sizes
in `DCP_SHARDING_INFO`). transformers redistributes every `_StridedShard` to a plain `Shard` before the save
(`distributed/checkpoint._redistribute_state_dict`), so rank r's chunk of a tensor is the box DTensor gives r for
the placements, over the dense mesh (dp_replicate, fsdp, tp) or the expert mesh (dp_replicate, efsdp, ep)
(`tpcli.planning.mesh`, which mirrors transformers' plan resolution for the mesh):

    dense tensors:  (Replicate, Shard(0) if FSDP shards it, its TP placement made contiguous, or Replicate)
    experts (EP):   (Replicate, Shard(0) if FSDP shards it, Shard(0))

computed by torch's own `_compute_local_shape_and_global_offset` (nested shards of one dim: the outer mesh dim
first). DCP's planner writes a replicated chunk once, on one of the ranks holding it (`dedup_save_plans`), so a
save is consistent with a mesh M of W ranks when, for every tensor,

    {saved boxes} = {boxes of the W ranks on M}   and   every saved box is its own rank's box on M
                                                      (empty boxes left out on both sides)

Every mesh of W ranks that transformers accepts for the model (`mesh_fit.candidate_meshes`, `MeshPlan`) is
tried. One consistent mesh: that is the mesh. Several: the save does not say which (e.g. with tp=1, ep=E shards
whole experts exactly as FSDP alone would: `fsdp=2` and `fsdp=2 x ep=2` write the same bytes); all are listed.
None: the layout is not one tpcli knows (another writer, another transformers version); nothing is claimed.
"""

from __future__ import annotations

from functools import lru_cache

from tpcli.errors import ModelError, UsageError
from tpcli.formats import dcp
from tpcli.planning.mesh import Mesh, MeshPlan
from tpcli.planning.plan import ResolvedPlan

CACHE_COMMAND = "saved-mesh"


def recorded(mesh: Mesh, ranks: int) -> dict:
    """A folder whose manifest records its mesh: a tpcli folder's tpcli.json (plain TP), a training state's
    tpcli-state.json."""
    doc = mesh.to_dict()
    return _described({"ranks": ranks, "recorded": True, "mesh": doc, "consistent_with": [doc]})


def infer(plan: ResolvedPlan, tensors: dict[str, dcp.ShardedTensor], files: list[str]) -> dict:
    """{"ranks": W, "recorded": False, "mesh": the mesh dict or None, "consistent_with": [mesh dicts],
    "description": text for a report}."""
    from tpcli.planning.mesh_fit import candidate_meshes

    ranks = sorted(int(dcp.SHARD_FILE_RE.match(f).group(1)) - 1 for f in files)
    world = len(ranks)
    found: list[Mesh] = []
    if ranks == list(range(world)):  # a gap in the numbering: not a whole save, nothing to infer
        for mesh in candidate_meshes(world, world, list(range(1, world + 1))):
            if _consistent(plan, mesh, tensors):
                found.append(mesh)
    docs = [m.to_dict() for m in found]
    return _described({"ranks": world, "recorded": False, "mesh": docs[0] if len(docs) == 1 else None,
                       "consistent_with": docs})


def sizes_label(m: dict) -> str:
    """'tp=2 x fsdp=2': the sizes above 1, in the order of the flags ('tp=1' when none is)."""
    return " x ".join(f"{k}={m[k]}" for k in ("pp", "tp", "fsdp", "dp_replicate", "ep") if m.get(k, 1) > 1) or "tp=1"


def describe(doc: dict) -> str:
    """'tp=2 x fsdp=2' when the mesh is known, else 'saved by W ranks (mesh not recorded; ...)'."""
    if doc["mesh"] is not None:
        return sizes_label(doc["mesh"])
    found = [sizes_label(m) for m in doc["consistent_with"]]
    if not found:
        what = (f"its chunk layout matches no mesh of {doc['ranks']} ranks that transformers accepts for this "
                "model")
    else:
        what = "layout consistent with " + (", ".join(found[:-1]) + " or " + found[-1])
    return f"saved by {doc['ranks']} rank{'s' * (doc['ranks'] != 1)} (mesh not recorded; {what})"


def _described(doc: dict) -> dict:
    return {**doc, "description": describe(doc)}


def tp_size(doc: dict) -> int | None:
    """The TP size the layout determines (also when only the other sizes are ambiguous), else None."""
    sizes = {m["tp"] for m in doc["consistent_with"]}
    return sizes.pop() if len(sizes) == 1 else None


def other_tp(doc: dict, tp: int) -> bool:
    """Whether the folder was certainly not saved at TP size `tp` (no consistent mesh has it)."""
    return all(m["tp"] != tp for m in doc["consistent_with"])


def _consistent(plan: ResolvedPlan, mesh: Mesh, tensors: dict[str, dcp.ShardedTensor]) -> bool:
    try:
        mp = MeshPlan(plan, mesh)
    except (UsageError, ModelError):  # transformers refuses this mesh for the model (e.g. --ep without experts)
        return False
    for name, t in tensors.items():
        spec = plan.tensors.get(name)
        group = mp.group_of.get(spec.tied_to if spec is not None and spec.tied_to else name)
        if group is None:
            return False
        boxes = [_box(tuple(t.shape), mesh, group.stage, group.placement, bool(group.fsdp), r)
                 for r in range(mesh.world)]
        expected = {b for b in boxes if _volume(b[1])}
        saved = set()
        for c in t.chunks:
            if not _volume(c.sizes):
                continue
            box = (tuple(c.offsets), tuple(c.sizes))
            if boxes[c.rank] != box:
                return False
            saved.add(box)
        if saved != expected:
            return False
    return True


def _volume(sizes) -> int:
    v = 1
    for s in sizes:
        v *= s
    return v


@lru_cache(maxsize=65536)
def _box(shape: tuple[int, ...], mesh: Mesh, stage: str, placement, fsdp: bool,
         rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of `rank`'s chunk of a tensor as transformers' DCP save writes it on `mesh`."""
    from torch.distributed.tensor import Replicate, Shard

    from tpcli.adapters.torch_api import compute_local_shape_and_global_offset

    c = mesh.coords(rank)
    if not shape:
        return (), ()
    outer = Shard(0) if fsdp else Replicate()
    if stage == "ep":
        mesh_shape, coord = (mesh.dp_replicate, mesh.efsdp, mesh.ep), [c["dp_replicate"], c["efsdp"], c["ep"]]
        inner = Shard(0)
    else:
        mesh_shape, coord = (mesh.dp_replicate, mesh.fsdp, mesh.tp), [c["dp_replicate"], c["fsdp"], c["tp"]]
        inner = placement.as_contiguous().to_torch() if stage == "tp" else Replicate()
    sizes, offsets = compute_local_shape_and_global_offset(shape, mesh_shape, coord, [Replicate(), outer, inner])
    return tuple(offsets), tuple(sizes)


def _valid(doc) -> bool:
    """A cached document has the shape `infer` gives (a cache entry is never trusted blindly)."""

    def mesh_ok(m) -> bool:
        return isinstance(m, dict) and set(m) == {"tp", "fsdp", "dp_replicate", "ep", "world"} and all(
            type(v) is int and v > 0 for v in m.values())

    return (isinstance(doc, dict) and type(doc.get("ranks")) is int and doc.get("recorded") is False
            and isinstance(doc.get("consistent_with"), list) and all(mesh_ok(m) for m in doc["consistent_with"])
            and (doc.get("mesh") is None or mesh_ok(doc["mesh"])))


def saved_by(checked) -> dict:
    """The `saved_by` document of `gather` / `verify DIR` for a folder `tpcli.runtime.folders.ShardedFolder` opened
    (`checked`: its path, manifest, state, files, tensors, plan): recorded (tpcli.json, tpcli-state.json) or
    inferred from the layout. The inference needs the model's plan: the one the folder was checked with, or one
    built from config.json now; its result is cached with the folder's fingerprint (`tpcli.formats.cache`), so a
    gather from a cached layout need not build it again."""
    from tpcli.formats import cache, state_manifest

    folder, meta = checked.path, checked.manifest
    if meta:
        return recorded(Mesh(tp=meta["tp_size"], pp=meta.get("pp_size", 1)), len(checked.files))
    if checked.state is not None:  # tpcli-state.json, read and checked when the folder was opened
        mesh = checked.state.mesh
        return recorded(Mesh(**{k: mesh[k] for k in state_manifest.MESH_KEYS}), len(checked.files))
    key = cache.key(CACHE_COMMAND, {"target": str(folder)}, sharded=True)
    doc = cache.get(key)
    if _valid(doc) and doc["ranks"] == len(checked.files):
        return _described(doc)  # the text is made here, never taken from the cache
    plan = checked.plan
    if plan is None:
        from tpcli.planning.plan import load_config, resolve_plan

        plan = resolve_plan(load_config(folder))
    return cache.put(key, infer(plan, checked.tensors, checked.files))

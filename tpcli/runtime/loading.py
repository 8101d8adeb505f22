"""`tpcli.load_model`: a TP-sharded transformers model inside a worker started by `tpcli run` (or torchrun).

    model = tpcli.load_model()                # path from $TPCLI_MODEL
    model = tpcli.load_model("/ckpt", dtype="bfloat16", tp_plan={"...": "colwise"})

* An ordinary checkpoint, a transformers DCP folder, or a tpcli folder at another TP size:
  `from_pretrained(path, distributed_config=DistributedConfig(tp_size=..., tp_plan=...))`, nothing re-implemented;
  on a mesh (`tpcli run --tp T --fsdp F --dp-replicate R --ep E`, TPCLI_MESH) this way with its sizes, except a
  tpcli tp=T folder on a mesh whose tp is T (no ep, not quantized, no packed placements: `mesh_fast_path_refusal`).
* A tpcli sharded folder whose tp equals the world size (the fast path): transformers builds the model exactly as
  `from_pretrained` does (`prepare_distribute_model`, `maybe_distribute_model`: the same DTensor placeholders and
  forward hooks, then `_move_missing_keys_from_meta_to_device` and `tie_weights`, as its own DCP load does), and each
  rank takes only the bytes of its local shards from its own rank files: about 1/N of the model plus the replicated
  tensors. On a tp=T x fsdp=F (x dp_replicate=R) mesh the model is built with the mesh's whole config (FSDP2
  included) and each rank reads only the box its placements give it: 1/(T x F) of the sharded bytes plus 1/F of
  the replicated ones; a `shard --pp P --tp T` folder on its pp x tp mesh: each rank its stage's tensors, its TP
  chunk of each. No collective, no DCP planning, no redistribution of strided shards. Every parameter owns its memory:
  the bytes are read (`readinto`) into it, never left as a view of a mapping of the rank file, so a file replaced,
  rewritten or truncated under a running job changes nothing the model computes (a private mapping is only
  copy-on-write for the pages the process writes: the others follow the file, and a truncated file is SIGBUS).
* Devices: each rank's model lives on `local_device()` (cuda:LOCAL_RANK on GPUs, as transformers binds it; the CPU
  otherwise). The fast path (`tpcli.runtime.fast_load`) never reads into device memory from the host: it stages
  device-bound bytes in pinned host buffers. The process group and its clean exit: `tpcli.runtime.process_group`.
"""

from __future__ import annotations

import os
from pathlib import Path

from tpcli.errors import CheckpointError
from tpcli.formats import manifest
from tpcli.runtime.adaptations import with_library_plans
from tpcli.runtime.fast_load import load_tpcli_shards
from tpcli.runtime.folders import ShardedFolder
from tpcli.runtime.meshinfo import mesh_config
from tpcli.runtime.process_group import local_device, start_process_group


@with_library_plans  # plans/: the automatic pick, `tp_plan="gpt2"`, and the plan's worker-side adaptations
def load_model(path: str | os.PathLike | ShardedFolder | None = None, *, tp_plan: dict | str = "auto", dtype=None,
               timeout_s: float | None = None, auto_class=None, mesh=None,
               **kwargs):
    """Return the model sharded for this process's rank on the job's mesh.

    The mesh is `mesh` (a `tpcli.planning.mesh.Mesh` or 'tp=2,fsdp=2' text), else TPCLI_MESH (`tpcli run --tp
    --fsdp --dp-replicate --ep`), else plain TP over the world (tp = WORLD_SIZE). Loaded with
    `from_pretrained(path, distributed_config=DistributedConfig(tp_size=T, fsdp_size=F, dp_replicate_size=R,
    ep_size=E, tp_plan=tp_plan))`; the model's `_device_mesh` is transformers' own. The process group, if this
    call creates it, waits `timeout_s` seconds in a collective (default: `process_group_timeout`, 2 hours).
    A sharded folder is opened once, with `verify`'s cheap checks (`ShardedFolder.open(quick=True)`: no hashes);
    `path` may be that object already (`with_library_plans` opens it to read the folder's plan)."""
    import torch

    from tpcli.formats.dcp import is_sharded_dir

    checked = path if isinstance(path, ShardedFolder) else None  # opened by `with_library_plans`
    path = checked.path if checked is not None else Path(path or os.environ.get("TPCLI_MODEL") or "")
    if not str(path) or str(path) == ".":
        raise CheckpointError("load_model: pass a path or run under `tpcli run --model PATH` (sets TPCLI_MODEL).")
    start_process_group(timeout_s)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    mesh = _job_mesh(mesh, world)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    # opened once, with the cheap checks (paths inside, sizes, headers, coverage, manifest = headers; not the sha256
    # of `tpcli verify`: loading reads every byte it needs once, hashing would read them all again)
    if checked is None and path.is_dir() and is_sharded_dir(path):
        checked = ShardedFolder.open(path, quick=True)
    doc = checked.manifest if checked is not None else None
    if doc is not None:
        why = fast_path_refusal(doc, mesh, world, tp_plan=tp_plan, kwargs=kwargs)
        if why is None:
            plain = mesh.tp == world  # plain TP: no fsdp, no replicas, no ep
            return load_tpcli_shards(path, doc, dtype=dtype, auto_class=auto_class, mesh=None if plain else mesh)
        preflighted = os.environ.get("TPCLI_MODEL") and Path(os.environ["TPCLI_MODEL"]).resolve() == path.resolve()
        if (not preflighted or tp_plan != "auto" or kwargs) and not doc.get("quantization") \
                and int(os.environ.get("RANK", "0")) == 0:  # `tpcli run --model`'s preflight said it already
            import sys

            print(f"tpcli.load_model: {path} loads through transformers' from_pretrained (DCP: every rank reads "
                  f"what its placements need), not tpcli's per-rank fast path: {why}", file=sys.stderr, flush=True)
    if (doc or {}).get("quantization"):
        raise CheckpointError(f"{path}: quantized tpcli shards load only at their own TP size "
                              f"(tp={doc['tp_size']}, world size {world}) with tp_plan='auto'; reshard with "
                              f"`tpcli shard {path} --tp {world}` or gather them.")
    if manifest.user_plan(doc) and tp_plan == "auto":
        tp_plan = manifest.user_plan(doc)
    cls = auto_class or _auto_class(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    extra = {"dtype": dtype} if dtype is not None else {}
    if world == 1:
        device = local_device()
        if device.type != "cpu" and "device_map" not in kwargs:  # `tpcli run --gpus 1`: on the GPU, as at tp > 1
            extra["device_map"] = device
        return cls.from_pretrained(str(path), **extra, **kwargs)
    if "distributed_config" not in kwargs:  # transformers' current API: `tp_plan=` alone is deprecated
        extra["distributed_config"] = mesh_config(mesh, tp_plan)
    if mesh.pp > 1 and mesh.tp > 1:  # transformers 5.23 applies the TP plan to layers a stage replaced: filter it
        from tpcli.runtime.pipeline_tp import stage_tp_plan

        with stage_tp_plan():
            return cls.from_pretrained(str(path), **extra, **kwargs)
    return cls.from_pretrained(str(path), **extra, **kwargs)


def _job_mesh(mesh, world: int):
    """The mesh to load on (see `load_model`), checked to cover the world."""
    from tpcli.planning.mesh import Mesh
    from tpcli.runtime.meshinfo import mesh_from_env, parse_mesh

    if mesh is None:
        return mesh_from_env(world)
    mesh = parse_mesh(mesh) if isinstance(mesh, str) else mesh
    if not isinstance(mesh, Mesh) or mesh.world != world:
        raise CheckpointError(f"load_model: mesh {mesh} does not cover the {world} ranks of this job "
                              "(tp x fsdp x dp_replicate must equal WORLD_SIZE).")
    return mesh


def fast_path_refusal(doc: dict, mesh, world: int, *, tp_plan="auto", kwargs=None) -> str | None:
    """Why `load_model` does not read the tpcli folder (its manifest `doc`) through the per-rank fast path on
    `mesh` over `world` processes (None: it does). Plain TP (tp = world) takes a tp=world folder; a mesh, see
    `mesh_fast_path_refusal`. A plan or `from_pretrained` arguments of the caller's always go to transformers."""
    if tp_plan != "auto":
        return "a tp_plan was passed"
    if kwargs:
        return f"from_pretrained arguments were passed ({', '.join(sorted(kwargs))})"
    if doc.get("pp_size", 1) > 1 or mesh.pp > 1:
        return mesh_fast_path_refusal(doc, mesh)
    if mesh.tp != world:
        return mesh_fast_path_refusal(doc, mesh)
    if world < 2:
        return f"one process (world size 1) loading a tp={doc['tp_size']} folder"
    if doc["tp_size"] != world:
        return f"its tp={doc['tp_size']} differs from the world size {world}"
    return None


def mesh_fast_path_refusal(doc: dict, mesh) -> str | None:
    """Why a tpcli folder (its manifest `doc`) on a mesh other than plain TP does not load through the fast path
    (None: it does). The fast path on a mesh takes a tpcli tp=T folder under tp=T with any fsdp and dp_replicate,
    and a pipeline folder (`shard --pp P --tp T`) on its own pp=P x tp=T mesh (each stage reads only its stage's
    tensors, its TP chunk of them; packed placements too, on a 1-D tp mesh): exactly the shapes tested against
    transformers' own load; anything else goes to `from_pretrained` (DCP: each stage's load plan reads what it
    needs, resharded)."""
    pp = doc.get("pp_size", 1)
    if pp != mesh.pp:
        return f"its pp={pp} differs from the mesh's pp={mesh.pp}"
    if doc["tp_size"] != mesh.tp:
        return f"its tp={doc['tp_size']} differs from the mesh's tp={mesh.tp}"
    if mesh.tp < 2 and pp == 1:
        return "the mesh has no TP (tp=1)"
    if mesh.ep > 1:
        return f"expert parallelism (ep={mesh.ep}) is not handled by the fast path"
    if doc.get("quantization"):
        return "quantized folders load through the fast path only on plain TP"
    packed = sorted(n for n, t in doc["tensors"].items() if str(t.get("placement", "")).startswith("_Strided"))
    if packed and mesh.tp > 1 and (mesh.fsdp > 1 or mesh.dp_replicate > 1):
        return f"packed (strided) TP placements ({packed[0]}) are not handled by the fast path on a mesh with FSDP"
    return None


def _auto_class(path: Path, *, trust_remote_code: bool = False):
    """The class the checkpoint declares (`architectures`), as `tpcli.planning.plan` and the fast path build it: a Qwen2.5-VL
    checkpoint is a Qwen2_5_VLForConditionalGeneration, which AutoModelForCausalLM does not map."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tpcli.planning.plan import check_config_files, model_class

    if trust_remote_code:  # remote code: only the Auto class knows how to fetch it
        return AutoModelForCausalLM
    check_config_files(path)
    return model_class(AutoConfig.from_pretrained(str(path)))

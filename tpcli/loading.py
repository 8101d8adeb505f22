"""`tpcli.load_model`: a TP-sharded transformers model inside a worker started by `tpcli run` (or torchrun).

    model = tpcli.load_model()                # path from $TPCLI_MODEL
    model = tpcli.load_model("/ckpt", dtype="bfloat16", tp_plan={"...": "colwise"})

* An ordinary checkpoint, a transformers DCP folder, or a tpcli folder at another TP size:
  `from_pretrained(path, tp_plan=...)`, nothing re-implemented.
* A tpcli sharded folder whose tp equals the world size (the fast path): transformers builds the model exactly as
  `from_pretrained` does (`prepare_distribute_model`, `maybe_distribute_model`: the same DTensor placeholders and
  forward hooks, then `_move_missing_keys_from_meta_to_device` and `tie_weights`, as its own DCP load does), and each
  rank copies in only the bytes of its local shards, read straight from the rank files with `get_slice`: about 1/N of
  the model plus the replicated tensors. No collective, no DCP planning, no redistribution of strided shards.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from . import manifest
from .errors import CheckpointError


def _init_process_group(timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return
    device_type = torch._C._get_accelerator().type
    backend = "nccl" if device_type == "cuda" else "gloo"
    kwargs = {}
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        kwargs["device_id"] = torch.device("cuda", local)
    # transformers would use a 2-hour timeout; a hung collective should fail a lot sooner than that.
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)


def load_model(path: str | os.PathLike | None = None, *, tp_plan: dict | str = "auto", dtype=None,
               timeout_s: float = float(os.environ.get("TPCLI_TIMEOUT", 1800)), auto_class=None, **kwargs):
    """Return a TP-sharded model for this process's rank (world size = TP size)."""
    import torch

    from .dcp import is_sharded_dir

    path = Path(path or os.environ.get("TPCLI_MODEL") or "")
    if not str(path) or str(path) == ".":
        raise CheckpointError("load_model: pass a path or run under `tpcli run --model PATH` (sets TPCLI_MODEL).")
    _init_process_group(timeout_s)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    doc = manifest.read(path) if path.is_dir() and is_sharded_dir(path) else None
    if doc is not None and doc["tp_size"] == world and world > 1 and tp_plan == "auto" and not kwargs:
        return _load_tpcli_shards(path, doc, dtype=dtype, auto_class=auto_class)
    if manifest.user_plan(doc) and tp_plan == "auto":
        tp_plan = manifest.user_plan(doc)
    cls = auto_class or _auto_class(path)
    extra = {"dtype": dtype} if dtype is not None else {}
    if world == 1:
        return cls.from_pretrained(str(path), **extra, **kwargs)
    return cls.from_pretrained(str(path), tp_plan=tp_plan, **extra, **kwargs)


def _auto_class(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def _load_tpcli_shards(folder: Path, doc: dict, *, dtype=None, auto_class=None):
    import torch
    from transformers import AutoConfig, GenerationConfig
    from transformers.distributed import DistributedConfig

    from .layout import rank_runs
    from .plan import _model_class
    from .styles import ParamPlacement

    rank = torch.distributed.get_rank()
    config = AutoConfig.from_pretrained(str(folder))
    cls = _model_class(config) if auto_class is None else auto_class._model_mapping[type(config)]
    dc = DistributedConfig(tp_plan=manifest.user_plan(doc) or "auto")
    dc, device_map, mesh_manager = cls.prepare_distribute_model(dc)
    config.distributed_config = dc
    if dtype is None:  # what the files hold (the most common tensor dtype), as dtype="auto" would pick
        from collections import Counter

        stored = Counter(t["dtype"] for t in doc["tensors"].values()).most_common(1)
        dtype = getattr(torch, doc["dtype"] or (stored[0][0] if stored else "float32"))
    from transformers.utils.generic import ContextManagers

    # the same init context as from_pretrained: meta device, the checkpoint dtype, weights not tied yet
    with ContextManagers(cls.get_init_context(dtype, False, False, False)):
        model = cls(config)
    model = cls.maybe_distribute_model(model, dc, mesh_manager)
    device_mesh = mesh_manager.get_mesh(("pp", "fsdp", "tp"))
    device_map = device_map if isinstance(device_map, dict) else {"": device_map}  # as from_pretrained expands it
    model._move_missing_keys_from_meta_to_device(set(model.state_dict()), device_map, device_mesh, None)
    model.tie_weights(recompute_mapping=False)

    reader = _SliceReader(folder)
    tied = set(model.all_tied_weights_keys)
    with torch.no_grad():
        for name, target in model.state_dict(keep_vars=True).items():
            if name in tied:
                continue
            entry = doc["tensors"].get(name)
            if entry is None:
                raise CheckpointError(f"{folder / 'tpcli.json'}: no entry for {name}; re-shard with this version.")
            local = target._local_tensor if hasattr(target, "_local_tensor") else target
            placements = getattr(target, "placements", ())
            placement = _placement(placements[0]) if placements else ParamPlacement("replicate")
            if placement.is_sharded:
                runs = rank_runs(entry["shape"][placement.dim], placement, len(doc["files"]))[rank]
            else:
                runs = None
            if str(local.dtype).removeprefix("torch.") != entry["dtype"]:  # e.g. dtype= asked for another precision
                local.copy_(reader.read_tensor(name, entry, placement.dim, runs))
            else:
                reader.read_into(local, name, entry, placement.dim, runs)
    for t in model.state_dict(keep_vars=True).values():
        t._is_hf_initialized = True
    model.initialize_weights()  # non-persistent buffers (rotary frequencies) only
    model.eval()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    model.tpcli_bytes_read = reader.bytes_read
    return model


def _placement(p):
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    from .styles import ParamPlacement

    if isinstance(p, _StridedShard):
        return ParamPlacement("strided", p.dim, p.split_factor)
    if isinstance(p, Shard):
        return ParamPlacement("shard", p.dim)
    return ParamPlacement("replicate")


class _SliceReader:
    """Fills local tensors from the rank files, reading only the byte ranges they need.

    At tp == world size a rank's Shard(d) slice is exactly one chunk of one file, contiguous on disk whatever d
    is, and a replicated tensor is one whole entry: both are read straight into the parameter's storage with
    `readinto`. Only `_StridedShard` slices (packed gate/up) span several chunks; they are sliced out of the
    files with safetensors' `get_slice`.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, object] = {}
        self.slicers: dict[str, object] = {}
        self.bytes_read = 0

    def _file(self, file: str):
        from .storage import TensorFile

        if file not in self.files:
            self.files[file] = TensorFile(self.folder / file)
        return self.files[file]

    def _slicer(self, file: str):
        from safetensors import safe_open

        if file not in self.slicers:
            self.slicers[file] = safe_open(str(self.folder / file), framework="pt")
        return self.slicers[file]

    def read_tensor(self, name: str, entry: dict, dim: int | None, runs):
        """This rank's slice as a new tensor in the stored dtype."""
        import torch

        out = torch.empty(self._local_shape(entry, dim, runs), dtype=getattr(torch, entry["dtype"]))
        self.read_into(out, name, entry, dim, runs)
        return out

    @staticmethod
    def _local_shape(entry: dict, dim: int | None, runs) -> list[int]:
        shape = list(entry["shape"])
        if runs is not None:
            shape[dim] = sum(b - a for a, b in runs)
        return shape

    def read_into(self, out, name: str, entry: dict, dim: int | None, runs) -> None:
        import torch

        chunks = entry["chunks"]
        whole = None
        if runs is None:  # replicated: one copy, stored in one file
            whole = chunks[0]
        elif len(runs) == 1:
            whole = next((c for c in chunks if (c["offsets"][dim], c["offsets"][dim] + c["sizes"][dim]) == runs[0]),
                         None)
        if whole is not None and out.is_contiguous() and list(out.shape) == whole["sizes"]:
            self._file(whole["file"]).read_into(name, out)
            self.bytes_read += out.numel() * out.element_size()
            return
        parts = []
        for start, stop in runs or [(0, entry["shape"][0])]:
            for c in chunks:  # the contiguous chunks on disk that overlap [start, stop)
                d = dim if dim is not None else 0
                lo, hi = c["offsets"][d], c["offsets"][d] + c["sizes"][d]
                a, b = max(start, lo), min(stop, hi)
                if a < b:
                    index = [slice(None)] * len(entry["shape"])
                    index[d] = slice(a - lo, b - lo)
                    part = self._slicer(c["file"]).get_slice(name)[tuple(index)]
                    self.bytes_read += part.numel() * part.element_size()
                    parts.append(part)
        out.copy_(parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim or 0))

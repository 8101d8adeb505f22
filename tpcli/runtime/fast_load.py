"""The fast path of `tpcli.load_model`: a tpcli folder whose tp is the job's, each rank reading only its own bytes.

Transformers builds the model exactly as `from_pretrained` does (`prepare_distribute_model`,
`maybe_distribute_model`: the same DTensor placeholders and forward hooks, then
`_move_missing_keys_from_meta_to_device` and `tie_weights`, as its own DCP load does), and each rank takes only the
bytes of its local shards from its own rank files: about 1/N of the model plus the replicated tensors. On a tp=T x
fsdp=F (x dp_replicate=R) mesh the model is built with the mesh's whole config (FSDP2 included) and each rank reads
only the box its placements give it: 1/(T x F) of the sharded bytes plus 1/F of the replicated ones. No collective,
no DCP planning, no redistribution of strided shards. Every parameter owns its memory: the bytes are read
(`pread`, `tpcli.formats.rankfile.RankFile`) into it, never left as a view of a mapping of the rank file, so a file
replaced, rewritten or truncated under a running job changes nothing the model computes. Device-bound bytes are
staged in two pinned host buffers of STAGING_CHUNK bytes and copied over piece by piece (`tpcli.formats.staging`);
the pinned memory is given back when the load is done.
"""

from __future__ import annotations

from pathlib import Path

from tpcli.adapters.torch_api import local_tensor, split_tensor
from tpcli.errors import CheckpointError
from tpcli.formats import manifest
from tpcli.formats.rankfile import RankFile, box_byte_runs
from tpcli.formats.staging import STAGING_CHUNK, Staging
from tpcli.runtime.meshinfo import mesh_config


def load_tpcli_shards(folder: Path, doc: dict, *, dtype=None, auto_class=None, mesh=None):
    """The fast path: build the model as `from_pretrained` does, then fill each rank's local tensors from its files.

    On a mesh (`mesh`: tp = the folder's T, with fsdp F and/or dp_replicate R; see `mesh_fast_path_refusal`) the
    model is built with the mesh's whole `DistributedConfig`, so `maybe_distribute_model` applies TP and then FSDP2
    (`fully_shard`) exactly as `from_pretrained` does; each parameter's local tensor is then read from the global
    box its DTensor placements give this rank (`_mesh_runs`): e.g. `(_StridedShard(0, sf=T), Shard(0))` on
    (fsdp, tp) is the f-th of F row blocks of the t-th TP chunk, one contiguous range of rank t's file. On a pp x tp
    mesh (a `shard --pp P --tp T` folder) `maybe_distribute_model` replaces the layers a stage does not own (with
    the TP plan limited to what the stage kept, `tpcli.runtime.pipeline_tp`), so a rank reads only its stage's
    tensors, its TP chunk of each.

    A folder holding a quantized checkpoint in its stored form (FP8 weights + `*_scale_inv`) goes through
    transformers' quantizer, as `from_pretrained` does: `validate_environment` decides whether this machine keeps
    FP8 (a GPU with compute capability >= 8.9) or dequantizes (CPU, older GPUs), and `preprocess_model` builds the
    matching modules and plan. Keeping FP8, each parameter (weights and scales) is read as stored. Dequantizing, rank
    r reads its FP8 slice and its scales (exactly the blocks of that slice, `tpcli.planning.checks.block_findings`) and applies
    transformers' `Fp8Dequantize` to them: elementwise, so equal bit for bit to dequantizing the whole tensor and
    slicing it, which is what a TP load of the original checkpoint holds. The FP8 (GPU) branch is written against
    transformers' code but has not run on a GPU in tpcli's tests.
    """
    import torch
    from transformers import AutoConfig, DistributedConfig, GenerationConfig

    from tpcli.adapters.transformers_api import (
        ContextManagers,
        auto_model_class,
        mark_initialized,
        move_missing_keys_from_meta_to_device,
    )
    from tpcli.planning.layout import rank_runs
    from tpcli.planning.placements import ParamPlacement
    from tpcli.planning.plan import check_config_files, model_class
    from tpcli.planning.quant import dequantize, make_quantizer, scale_name

    rank = torch.distributed.get_rank()
    world = len(doc["files"])
    check_config_files(folder)
    config = AutoConfig.from_pretrained(str(folder))
    cls = model_class(config) if auto_class is None else auto_model_class(auto_class, config)
    if mesh is None:
        dc = DistributedConfig(tp_plan=manifest.user_plan(doc) or "auto")
    else:
        dc = mesh_config(mesh, manifest.user_plan(doc) or "auto")
    dc, device_map, mesh_manager = cls.prepare_distribute_model(dc)
    config.distributed_config = dc
    quantizer = None
    if (doc.get("quantization") or {}).get("representation") == "stored":
        quantizer = make_quantizer(config, dequantize=False)
        quantizer.validate_environment(device_map=device_map, weights_only=True)  # CPU: sets dequantize=True
    if dtype is None:  # dtype="auto"
        if quantizer is not None:  # the checkpoint's non-quantized dtype, from config.json
            dtype = getattr(torch, str(getattr(config, "dtype", None) or "float32").removeprefix("torch."))
        else:  # what the files hold (the most common tensor dtype)
            from collections import Counter

            stored = Counter(t["dtype"] for t in doc["tensors"].values()).most_common(1)
            dtype = getattr(torch, doc["dtype"] or (stored[0][0] if stored else "float32"))

    # the same init context as from_pretrained: meta device, the checkpoint dtype, weights not tied yet
    with ContextManagers(cls.get_init_context(dtype, quantizer is not None, False, False)):
        model = cls(config)
        if quantizer is not None:
            quantizer.preprocess_model(model=model, dtype=dtype, device_map=device_map, checkpoint_files=None,
                                       use_kernels=False)
    if mesh is not None and mesh.pp > 1 and mesh.tp > 1:  # transformers 5.23 would TP-shard the replaced layers
        from tpcli.runtime.pipeline_tp import stage_tp_plan

        with stage_tp_plan():
            model = cls.maybe_distribute_model(model, dc, mesh_manager)
    else:
        model = cls.maybe_distribute_model(model, dc, mesh_manager)
    device_mesh = mesh_manager.get_mesh(("pp", "fsdp", "tp"))
    device_map = device_map if isinstance(device_map, dict) else {"": device_map}  # as from_pretrained expands it
    move_missing_keys_from_meta_to_device(model, set(model.state_dict()), device_map, device_mesh, None)
    model.tie_weights(recompute_mapping=False)

    reader = SliceReader(folder)
    tied = set(model.all_tied_weights_keys)

    def local_runs(entry, placement):
        return rank_runs(entry["shape"][placement.dim], placement, world)[rank] if placement.is_sharded else None

    with torch.no_grad():
        for name, target in model.state_dict(keep_vars=True).items():
            if name in tied:
                continue
            entry = doc["tensors"].get(name)
            if entry is None:
                raise CheckpointError(f"{folder / 'tpcli.json'}: no entry for {name}; re-shard with this version.")
            local = local_tensor(target)
            if mesh is not None:  # any box of the global tensor: placements on the whole (dp, fsdp, tp) mesh
                reader.read_box_into(local, name, entry, _mesh_runs(target))
                continue
            placements = getattr(target, "placements", ())
            placement = placement_of(placements[0]) if placements else ParamPlacement("replicate")
            scale = doc["tensors"].get(scale_name(name)) if quantizer is not None else None
            if scale is None or local.dtype == getattr(torch, entry["dtype"]):
                # as stored (FP8 weights and scales on an FP8 GPU, every tensor without scales): any device, any
                # dtype (cast on copy)
                reader.read_into(local, name, entry, placement.dim, local_runs(entry, placement))
                continue
            # dequantizing: the scales are sharded like their weight (same style, same number of dims)
            stored = reader.read_tensor(name, entry, placement.dim, local_runs(entry, placement))
            scales = reader.read_tensor(scale_name(name), scale, placement.dim, local_runs(scale, placement))
            local.copy_(dequantize(stored, scales, local.dtype))  # computed on the host, then one copy to the target
    reader.finish()  # the last copies to the device have landed; the staging buffers can go
    for t in model.state_dict(keep_vars=True).values():
        mark_initialized(t)
    model.initialize_weights()  # non-persistent buffers (rotary frequencies) only
    if quantizer is not None:
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)  # as from_pretrained: drops quantization_config when it dequantized
    model.eval()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    model.tpcli_bytes_read = reader.bytes_read
    return model


def placement_of(p):
    from torch.distributed.tensor import Shard

    from tpcli.adapters.torch_api import StridedShard
    from tpcli.planning.placements import ParamPlacement

    if isinstance(p, StridedShard):
        return ParamPlacement("strided", p.dim, p.split_factor)
    if isinstance(p, Shard):
        return ParamPlacement("shard", p.dim)
    return ParamPlacement("replicate")


def _mesh_runs(target) -> list[tuple[tuple[int, int], ...]]:
    """Per dim of `target`'s global shape, the runs of indices (start, stop) its local tensor holds, in order.

    DTensor's own split, applied to an index vector per dim, mesh dim by mesh dim from the first (as
    `distribute_tensor` applies placements): `Shard(d)` takes chunk c of the indices left along d, `_StridedShard(d,
    sf)` the c-th chunk of each of its sf groups, `Replicate` keeps them; c is this rank's coordinate on that mesh dim.
    E.g. rows N over (fsdp F, tp T) with `(_StridedShard(0, sf=T), Shard(0))`: rank (f, t) holds rows
    t*N/T + f*N/(T*F) ... + N/(T*F) (even sizes), the f-th block of the t-th TP chunk. A plain tensor: everything."""
    import torch

    from tpcli.planning.layout import index_runs
    from tpcli.planning.placements import ParamPlacement

    shape = list(target.shape)
    if not hasattr(target, "placements"):
        return [((0, n),) if n else () for n in shape]
    mesh, coord = target.device_mesh, target.device_mesh.get_coordinate()
    index = [torch.arange(n) for n in shape]
    for i, p in enumerate(target.placements):
        pp = placement_of(p)
        if not pp.is_sharded:
            continue
        d = pp.dim % len(shape)
        along_0 = ParamPlacement(pp.kind, 0, pp.split_factor).to_torch()  # the index vector is 1-D
        pieces = split_tensor(along_0, index[d], mesh.size(i))
        index[d] = pieces[coord[i]]
    runs = [index_runs(v) for v in index]
    local = list(local_tensor(target).shape)
    if [sum(b - a for a, b in r) for r in runs] != local:  # DTensor's split and its local tensor must agree
        raise AssertionError(f"local shape {local} != the split {runs} of {shape} by {target.placements}")
    return runs


class SliceReader:
    """Fills local tensors from the rank files, reading only the byte ranges they need.

    At tp == world size a rank's Shard(d) slice is exactly one chunk of one file, contiguous on disk whatever d
    is, and a replicated tensor is one whole entry: both are read with one `pread`. Only `_StridedShard` slices
    (packed gate/up) span several chunks; each chunk's part is a sub-box of it (`RankFile.read_box_into`).
    Every file is a `RankFile`: opened once per load, its header checked once.

    Where the bytes land depends on the target, never on the path that read them:
    * host-direct: a CPU target of the stored dtype is read straight into its own storage (no copy); never a view
      of a mapping of the file (the file may change under a running job);
    * staged: any other target (a CUDA parameter, a `meta` one, another dtype) is filled piece by piece: the bytes
      of elements [a, b) (`staging_spans`: at most `chunk_bytes` each) are read into a host staging buffer and
      copied to the same elements of the target with `_to_target` (`copy_` casts when the dtypes differ) by
      `Staging.copy_into`, so the buffers never grow with the tensors. A slice stored as one chunk of one file
      (every Shard and replicated tensor) is read from the file a piece at a time (`RankFile.read_run_to`); a
      `_StridedShard` slice is assembled in ordinary host memory first (`read_tensor`), then staged. Device memory
      is never touched from the host: no `.numpy()`, no `pread` into a device tensor.
    `stage=True` forces staging for CPU targets too (tests compare it with the direct path byte for byte).
    """

    def __init__(self, folder: Path, *, stage: bool = False, chunk_bytes: int = STAGING_CHUNK):
        self.folder = folder
        self.files: dict[str, RankFile] = {}
        self.bytes_read = 0  # bytes of the files this rank's tensors come from
        self.force_stage = stage
        self.staging = Staging(chunk_bytes)

    def _file(self, file: str) -> RankFile:
        if file not in self.files:
            self.files[file] = RankFile(self.folder / file)
        return self.files[file]

    @staticmethod
    def _local_shape(entry: dict, dim: int | None, runs) -> list[int]:
        shape = list(entry["shape"])
        if runs is not None:
            shape[dim] = sum(b - a for a, b in runs)
        return shape

    def read_tensor(self, name: str, entry: dict, dim: int | None, runs):
        """This rank's slice as a new CPU tensor in the stored dtype."""
        import torch

        out = torch.empty(self._local_shape(entry, dim, runs), dtype=getattr(torch, entry["dtype"]))
        self._read_host(out, name, entry, dim, runs)
        return out

    def read_into(self, out, name: str, entry: dict, dim: int | None, runs) -> None:
        """Fill `out` (any device, any dtype, this rank's local shape) with this rank's slice of `name`."""

        def one_run():  # the slice is one stored chunk (a replicated tensor's one copy): one run of bytes
            whole = self._whole_chunk(entry, dim, runs)
            return (whole["file"], 0) if whole is not None and shape == whole["sizes"] else None

        shape = self._local_shape(entry, dim, runs)
        self._fill(out, name, entry, shape, lambda host: self._read_host(host, name, entry, dim, runs), one_run)

    def read_box_into(self, out, name: str, entry: dict, runs: list) -> None:
        """Fill `out` (any device, any dtype) with the part of `name` that `runs` (per dim, `_mesh_runs`) name;
        staged from the file itself when the box is one run of bytes of one chunk (every FSDP row block)."""
        import torch

        itemsize = getattr(torch, entry["dtype"]).itemsize
        self._fill(out, name, entry, [sum(b - a for a, b in r) for r in runs],
                   lambda host: self._read_box_host(host, name, entry, runs),
                   lambda: self._one_run(entry, runs, itemsize))

    def _fill(self, out, name: str, entry: dict, shape: list[int], read_host, one_run) -> None:
        """Fill `out` with the slice of `name` of local shape `shape`. A contiguous CPU target of the stored dtype is
        read straight into (`read_host(out)`); a non-contiguous one (not a parameter's local tensor) gets one
        synchronous copy from ordinary memory; any other is staged piece by piece (`Staging.copy_into`), from the file
        when `one_run()` gives (file, byte offset in the tensor's data) of the slice as one run of bytes, else from
        the slice put together in ordinary host memory first (`read_host` into a new tensor)."""
        import torch

        stored = getattr(torch, entry["dtype"])
        if out.device.type == "cpu" and out.dtype == stored and out.is_contiguous() and not self.force_stage:
            read_host(out)
            return

        def on_host():
            host = torch.empty(shape, dtype=stored)
            read_host(host)
            return host

        if not out.is_contiguous():
            out.copy_(on_host())
            return
        source = one_run()
        if source is not None:
            self._file(source[0]).read_run_to(name, source[1], out, self.staging, self._to_target)
            self.bytes_read += out.numel() * stored.itemsize
            return
        flat = on_host().view(-1)

        def fill(buf, a: int) -> None:
            buf.copy_(flat[a:a + buf.numel() // stored.itemsize].view(torch.uint8))

        self.staging.copy_into(out, stored, fill, self._to_target)

    @staticmethod
    def _one_run(entry: dict, runs: list, itemsize: int):
        """(file, byte offset) when the box `runs` is one run of bytes inside one stored chunk, else None."""
        if any(len(r) != 1 for r in runs):
            return None
        box = [r[0] for r in runs]
        for c in entry["chunks"]:
            if all(o <= a and b <= o + n for (a, b), o, n in zip(box, c["offsets"], c["sizes"], strict=True)):
                lo = [a - o for (a, _), o in zip(box, c["offsets"], strict=True)]
                hi = [b - o for (_, b), o in zip(box, c["offsets"], strict=True)]
                byte_runs = box_byte_runs(c["sizes"], lo, hi, itemsize)
                if len(byte_runs) == 1:
                    return c["file"], byte_runs[0][0]
        return None

    def _read_box_host(self, out, name: str, entry: dict, runs: list) -> None:
        """Read the box(es) `runs` of `name`'s global tensor into the contiguous CPU tensor `out` (stored dtype):
        each stored chunk that overlaps a box gives its overlap, read from the chunk's file with `_read_sub`; the
        overlaps must cover `out` exactly once."""
        import itertools

        import torch

        covered = 0
        for box in itertools.product(*runs):  # one box per combination of runs (usually exactly one)
            at = [sum(b - a for a, b in r[:r.index(x)]) for r, x in zip(runs, box, strict=True)]  # its place in out
            for c in entry["chunks"]:
                lo = [max(a, o) for (a, _), o in zip(box, c["offsets"], strict=True)]
                hi = [min(b, o + n) for (_, b), o, n in zip(box, c["offsets"], c["sizes"], strict=True)]
                if any(a >= b for a, b in zip(lo, hi, strict=True)):
                    continue
                region = tuple(slice(p + a - x, p + b - x) for p, a, b, (x, _) in zip(at, lo, hi, box, strict=True))
                sub_lo = [a - o for a, o in zip(lo, c["offsets"], strict=True)]
                sub_hi = [b - o for b, o in zip(hi, c["offsets"], strict=True)]
                if [b - a for a, b in zip(lo, hi, strict=True)] == list(out.shape):
                    dest = out  # the whole local tensor from one chunk: read straight into it
                else:
                    dest = torch.empty([b - a for a, b in zip(lo, hi, strict=True)], dtype=out.dtype)
                self.bytes_read += self._file(c["file"]).read_box_into(name, sub_lo, sub_hi, dest)
                if dest is not out:
                    out[region].copy_(dest)
                covered += dest.numel()
        if covered != out.numel():
            raise CheckpointError(f"{self.folder / 'tpcli.json'}: the chunks of {name} cover {covered} of the "
                                  f"{out.numel()} elements this rank needs; re-shard the folder with this version.")

    @staticmethod
    def _whole_chunk(entry: dict, dim: int | None, runs):
        """The stored chunk that is exactly this rank's slice (a replicated tensor's one copy), or None."""
        chunks = entry["chunks"]
        if runs is None:
            return chunks[0]
        if len(runs) == 1:
            return next((c for c in chunks if (c["offsets"][dim], c["offsets"][dim] + c["sizes"][dim]) == runs[0]),
                        None)
        return None

    def _to_target(self, out, host) -> None:
        """The one step that touches the target: a device-side copy (a no-op on meta; async from pinned memory)."""
        out.copy_(host, non_blocking=host.is_pinned())

    def finish(self) -> None:
        """Wait for the last copies to the device, give the staging buffers back and close the files."""
        self.staging.release()
        for f in self.files.values():
            f.close()
        self.files.clear()

    def _read_host(self, out, name: str, entry: dict, dim: int | None, runs) -> None:
        """Read this rank's slice into the contiguous CPU tensor `out` of the stored dtype."""
        import torch

        chunks = entry["chunks"]
        whole = self._whole_chunk(entry, dim, runs)  # replicated: its one copy, stored in one file
        if whole is not None and list(out.shape) == whole["sizes"]:
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
                    box_lo, box_hi = [0] * len(c["sizes"]), list(c["sizes"])
                    box_lo[d], box_hi[d] = a - lo, b - lo
                    part = torch.empty([h - l_ for l_, h in zip(box_lo, box_hi, strict=True)], dtype=out.dtype)
                    self.bytes_read += self._file(c["file"]).read_box_into(name, box_lo, box_hi, part)
                    parts.append(part)
        if len(parts) == 1:
            out.copy_(parts[0])
        else:
            torch.cat(parts, dim=dim or 0, out=out)

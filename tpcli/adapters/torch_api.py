"""torch internals tpcli uses, behind one module: written against torch 2.13 (`versions.ADAPTERS`).

* `INTERNALS`: private classes and functions, imported lazily by name (`from tpcli.adapters.torch_api import
  StridedShard` imports torch's placement types at that moment, not when this module is imported).
* functions below: private methods and attributes of torch objects (`Shard._split_tensor`,
  `DTensor._local_tensor`, `nn.Module._parameters`, `torch._C._get_accelerator`).

Not wrapped here, because they are data and not code: the pickle allow-lists that name classes a hostile file may
build, `tpcli.formats.dcp_metadata.ALLOWED` (`torch.distributed.checkpoint.filesystem._StorageInfo`,
`torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING`, `torch.serialization._get_layout`) and
`tpcli.formats.train_pt.ALLOWED` (`torch.distributed.tensor._dtensor_spec.{DTensorSpec,TensorMeta,ShardOrderEntry}`,
`torch.distributed._mesh_layout.{_MeshLayout,_FlatLayout}`): a class a torch release moves is refused there, so a
file naming it fails closed with a one-line CheckpointError.
"""

from __future__ import annotations

from tpcli.adapters import lazy_internals

# name -> (module, attribute, what tpcli uses it for). All present in torch 2.13.0.
INTERNALS: dict[str, tuple[str, str, str]] = {
    "StridedShard": ("torch.distributed.tensor.placement_types", "_StridedShard",
                     "Shard(dim) of each of `split_factor` interleaved blocks (packed gate|up, q|k|v)"),
    "StorageInfo": ("torch.distributed.checkpoint.filesystem", "_StorageInfo",
                    "where a DCP chunk lies: (relative_path, offset, length)"),
    "dedup_save_plans": ("torch.distributed.checkpoint._dedup_save_plans", "dedup_save_plans",
                         "DCP's choice of the one rank that writes a replicated item"),
    "set_element": ("torch.distributed.checkpoint._traverse", "set_element",
                    "put a value at a DCP path inside a nested state dict"),
    "compute_local_shape_and_global_offset": ("torch.distributed.tensor._utils",
                                              "_compute_local_shape_and_global_offset",
                                              "(sizes, offsets) of a rank's DTensor chunk on a mesh"),
}

# Private methods of torch classes the functions below use: (owner, attribute), checked by tests/test_adapters.py.
PRIVATE_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("torch.distributed.tensor.Shard", "_split_tensor"),
    ("torch.distributed.tensor.placement_types._StridedShard", "_split_tensor"),
    ("torch._C", "_get_accelerator"),
)


__getattr__ = lazy_internals(__name__, INTERNALS)


def split_tensor(placement, tensor, num_chunks: int) -> list:
    """The pieces `distribute_tensor` gives each of `num_chunks` ranks along the placement's dim, unpadded
    (`Shard._split_tensor(tensor, n, with_padding=False)`; `_StridedShard` overrides it with the interleaved
    split). E.g. Shard(0) of arange(5) in 2: [0, 1, 2], [3, 4]."""
    pieces, _ = placement._split_tensor(tensor, num_chunks, with_padding=False)
    return pieces


def local_tensor(value):
    """This rank's shard of a DTensor, as the very tensor it holds (`DTensor._local_tensor`: no copy, no autograd
    node, unlike `to_local()`); a plain tensor is returned as it is."""
    return getattr(value, "_local_tensor", value)


def module_parameters(module) -> dict:
    """A module's own parameter dict (`nn.Module._parameters`): read or replace a parameter without
    `register_parameter`'s checks (a DTensor or a plain tensor in place of a Parameter)."""
    return module._parameters


def accelerator_type() -> str:
    """The device type torch finds on this machine, "cpu" when none (`torch._C._get_accelerator().type`, what
    transformers asks; `torch.accelerator.current_accelerator()` returns None instead of "cpu")."""
    import torch

    return torch._C._get_accelerator().type

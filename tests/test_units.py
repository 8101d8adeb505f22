"""tpcli.formats.units: one table of dtype sizes for every layer; an unknown dtype is an error, never 4 bytes."""

import pytest
import torch

from tpcli.errors import CheckpointError
from tpcli.formats.units import DTYPE_SIZES, SAFETENSORS_CODES, dtype_size, human_bytes, tensor_bytes


@pytest.mark.parametrize("name", sorted(DTYPE_SIZES))
def test_sizes_are_torch_own(name):
    if not hasattr(torch, name):
        pytest.skip(f"torch {torch.__version__} has no {name}")
    assert dtype_size(name) == getattr(torch, name).itemsize
    assert dtype_size(f"torch.{name}") == dtype_size(name)


def test_unknown_dtype_raises():
    with pytest.raises(CheckpointError, match="float7"):
        dtype_size("float7")


def test_tensor_bytes_and_codes():
    assert tensor_bytes("bfloat16", (3, 5)) == 30
    assert set(SAFETENSORS_CODES) <= set(DTYPE_SIZES)
    assert human_bytes(1536) == "1.50 KiB" and human_bytes(12) == "12 B"

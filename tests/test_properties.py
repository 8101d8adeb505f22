"""Property tests (hypothesis, derandomized so CI is deterministic).

1. shard -> gather is the identity at the engine level: random shapes, dtypes (bool, int8, float8 included), TP
   sizes with uneven and empty splits, and every placement tpcli slices (Shard on each dim, packed
   `_StridedShard`, Replicate). Each rank's chunk on disk is also compared with the piece torch's own placement
   code (`Placement._split_tensor`, what DTensor holds; `_StridedShard` is saved as `Shard`, as transformers does)
   gives that rank, and a replicated tensor is stored exactly once.
2. The safetensors header reader: on random bytes it raises nothing but CheckpointError, and on random
   structured headers it accepts exactly the files the safetensors library accepts.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpcli.errors import CheckpointError
from tpcli.formats import dcp
from tpcli.formats.rankfile import read_header
from tpcli.formats.tensor_file import StreamWriter
from tpcli.formats.units import SAFETENSORS_BITS
from tpcli.planning.layout import plan_chunks
from tpcli.planning.placements import ParamPlacement
from tpcli.planning.plan import TensorInfo
from tpcli.planning.readers import ShardedReader

SETTINGS = settings(max_examples=30, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MANY = settings(SETTINGS, max_examples=100)  # header checks are cheap
DTYPES = ["float32", "bfloat16", "float16", "int8", "uint8", "bool", "float8_e4m3fn", "int64"]


@st.composite
def tensors(draw):
    n = draw(st.integers(1, 3))
    out = []
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
        kind = draw(st.sampled_from(["replicate", "shard", "strided"]))
        dim = draw(st.integers(0, len(shape) - 1))
        if kind == "strided":
            sf = draw(st.sampled_from([2, 3]))
            shape = tuple(s * sf if d == dim else s for d, s in enumerate(shape))  # packed: sf equal blocks
            placement = ParamPlacement("strided", dim, sf)
        else:
            placement = ParamPlacement(kind, dim if kind == "shard" else None)
        dtype = draw(st.sampled_from(DTYPES))
        out.append(TensorInfo(name=f"t{i}.weight", shape=shape, dtype=dtype, style=None, rule=None,
                              placement=placement))
    return out


def _random(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == "bool":
        return torch.randint(0, 2, shape, generator=g).bool()
    n = torch.Size(shape).numel() * getattr(torch, dtype).itemsize
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(getattr(torch, dtype)).reshape(shape)


def _bytes(t):
    return t.contiguous().view(-1).view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8).view(-1)


@SETTINGS
@given(infos=tensors(), tp=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_shard_then_gather_is_the_identity(infos, tp, seed):
    full = {t.name: _random(t.shape, t.dtype, seed + i) for i, t in enumerate(infos)}
    chunks = plan_chunks(infos, tp)
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        for r in range(tp):  # what `tpcli shard` writes for rank r
            w = StreamWriter(folder / dcp.shard_file_name(r), [(c.name, c.dtype, c.sizes) for c in chunks[r]],
                             dcp.sharding_metadata(chunks[r]))
            for c in chunks[r]:
                w.write(c.name, full[c.name][tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=True))])
            w.close()
        reader = ShardedReader(folder)
        try:
            for t in infos:
                back = reader.read_full(t.name)
                assert back.dtype == full[t.name].dtype and tuple(back.shape) == t.shape
                assert torch.equal(_bytes(back), _bytes(full[t.name])), t
                on_disk = {c.rank: reader.handle(folder / c.file).get_tensor(t.name) for c in reader.tensors[t.name].chunks}
                if not t.placement.is_sharded:
                    assert len(on_disk) == 1  # replicated: one copy, on the rank torch's DCP planner picks
                    continue
                pieces, _ = t.placement.as_contiguous().to_torch()._split_tensor(full[t.name], tp, with_padding=False)
                for r, piece in enumerate(pieces):  # torch's own split is the oracle for each rank's chunk
                    if piece.numel():
                        assert torch.equal(_bytes(on_disk[r]), _bytes(piece)), (t, r)
        finally:
            reader.close()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _library_accepts(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np"):
            return True
    except Exception:
        return False


@MANY
@given(data=st.binary(max_size=256))
def test_random_bytes_give_only_checkpoint_errors(data):
    with tempfile.TemporaryDirectory() as d:
        path = _write(Path(d) / "x.safetensors", data)
        try:
            read_header(path)
        except CheckpointError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
        else:
            assert _library_accepts(path)


CODES = sorted(SAFETENSORS_BITS)


@st.composite
def headers(draw):
    """A safetensors file from a random header: mostly well-formed, then broken in one of the ways files break."""
    header, offset = {}, 0
    for i in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from([c for c in CODES if SAFETENSORS_BITS[c] % 8 == 0]))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        n = SAFETENSORS_BITS[dtype] // 8
        for s in shape:
            n *= s
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    extra = 0
    breakage = draw(st.sampled_from(["none", "none", "dtype", "shape", "offsets", "drop", "overlap", "meta",
                                     "tail", "short", "float", "negative", "not-object"]))
    names = list(header)
    pick = draw(st.sampled_from(names)) if names else None
    if breakage == "dtype" and pick:
        header[pick]["dtype"] = draw(st.sampled_from(["F33", "f32", "", "INT8"]))
    elif breakage == "shape" and pick:
        header[pick]["shape"] = draw(st.sampled_from(["4", [1.5], [[2]], None, [2, "x"], [10**30], [True]]))
    elif breakage == "offsets" and pick:
        b, e = header[pick]["data_offsets"]
        header[pick]["data_offsets"] = draw(st.sampled_from([[e, b], [b], [b, e, e], [b, e + 1], [b + 1, e + 1]]))
    elif breakage == "drop" and pick:
        del header[pick][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif breakage == "overlap" and len(names) > 1:
        header[names[1]]["data_offsets"] = list(header[names[0]]["data_offsets"])
    elif breakage == "meta":
        header["__metadata__"] = draw(st.sampled_from([{"a": 1}, {"a": None}, ["a"], "a", {"a": "b"}]))
    elif breakage == "tail":
        extra = draw(st.integers(1, 8))
    elif breakage == "short":
        extra = -draw(st.integers(1, 8))
    elif breakage == "float" and pick:
        header[pick]["data_offsets"] = [float(x) for x in header[pick]["data_offsets"]]
    elif breakage == "negative" and pick:
        header[pick]["shape"] = [-1, *header[pick]["shape"]]
    elif breakage == "not-object":
        header = draw(st.sampled_from([[], "x", 3]))
    raw = json.dumps(header).encode()
    raw += b" " * draw(st.integers(0, 8))
    data = bytes(max(0, offset + extra))
    return struct.pack("<Q", len(raw)) + raw + data


@MANY
@given(data=headers())
def test_header_reader_agrees_with_the_safetensors_library(data):
    with tempfile.TemporaryDirectory() as d:
        path = _write(Path(d) / "x.safetensors", data)
        try:
            read_header(path)
            accepted = True
        except CheckpointError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
            accepted = False
        assert accepted == _library_accepts(path), data[:300]


@pytest.mark.parametrize("kind", ["shard", "strided"])
def test_identity_would_catch_a_misplaced_chunk(kind, tmp_path):
    """The identity test above can fail: write rank 1's chunk with rank 0's bytes and the read-back differs."""
    t = TensorInfo(name="w", shape=(6, 4), dtype="float32", style=None, rule=None,
                   placement=ParamPlacement(kind, 0, 2 if kind == "strided" else 1))
    full = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    chunks = plan_chunks([t], 2)
    for r in range(2):
        (c,) = chunks[r]
        w = StreamWriter(tmp_path / dcp.shard_file_name(r), [(c.name, c.dtype, c.sizes)], dcp.sharding_metadata(chunks[r]))
        w.write("w", full[:c.sizes[0]])  # always the first rows: wrong for rank 1
        w.close()
    reader = ShardedReader(tmp_path)
    assert not torch.equal(reader.read_full("w"), full)
    reader.close()

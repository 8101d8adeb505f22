"""Staging in fixed-size pieces (issue 28 item 3): a device-bound tensor is copied through two host buffers of
`chunk_bytes` each, piece by piece, so the pinned memory a rank holds is 2 x STAGING_CHUNK whatever the largest
tensor (before: each buffer grew to the largest tensor carried, a replicated embedding whole).

Proven here with CPU and `meta` targets and a chunk size of 50 or 100 bytes (CHUNKS), so that every tensor of the
fixture models goes in many pieces whose edges fall inside rows: the bytes equal the direct path's (and thereby
DTensor's split, tests/test_loading_device.py), and no staging buffer is ever larger than a chunk. The CUDA side (pinned
buffers, events, the pinned memory given back) is tests/test_gpu.py::test_chunked_staging_on_a_delayed_stream.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_loading_device import TP, _jobs, sharded  # noqa: F401 - `sharded` is a fixture used below

from tpcli.formats.staging import STAGING_CHUNK, staging_spans
from tpcli.runtime.fast_load import SliceReader

# bytes per piece, below the shortest row of each fixture model (so never a whole row, and edges inside rows):
# qwen3's q/k norms are 16 fp32 (64 B): 12 fp32 per piece; mixtral's shortest rows, o_proj's 32 fp32 at tp=2
# (128 B): 25 fp32 per piece (half the pieces of 50 B, the same paths: ~12,000 per read of the model)
CHUNKS = {"qwen3": 50, "mixtral": 100}


@pytest.mark.parametrize("numel", [0, 1, 11, 12, 13, 1000, 12_345])
@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
@pytest.mark.parametrize("chunk", [1, 3, 50, 4096])
def test_spans_cover_the_tensor_once_in_pieces_of_at_most_a_chunk(numel, itemsize, chunk):
    spans = staging_spans(numel, itemsize, chunk)
    step = max(1, chunk // itemsize)
    assert len(spans) == math.ceil(numel / step)
    assert [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]] or numel == 0  # consecutive, from 0
    assert not spans or spans[-1][1] == numel
    assert all(0 < (b - a) * itemsize <= max(chunk, itemsize) for a, b in spans)
    assert all(b - a == step for a, b in spans[:-1])


def test_spans_examples():
    assert staging_spans(10, 4, 16) == [(0, 4), (4, 8), (8, 10)]
    assert staging_spans(5 * 2**20, 4) == [(0, 4 * 2**20), (4 * 2**20, 5 * 2**20)]  # 20 MiB of fp32: 16 + 4
    assert STAGING_CHUNK == 16 * 2**20


class _Pieces(SliceReader):
    """The staged path with its device-touching step observed: every piece copied, and the largest buffer."""

    def __init__(self, *args, keep: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.pieces: list[tuple] = []
        self.largest = 0
        self.keep = keep

    def _to_target(self, out, host):
        self.pieces.append((out, host.clone() if self.keep else None))  # the buffer is reused: keep what it held
        self.largest = max([self.largest] + [b.numel() for b in self.staging.buffers if b is not None])
        super()._to_target(out, host)


@pytest.mark.parametrize("name", ["qwen3", "mixtral"])  # Shard/replicated tensors; _StridedShard gate_up
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])  # the stored dtype, and a cast on copy
def test_pieces_rebuild_every_tensor_and_buffers_stay_one_chunk(sharded, name, dtype):  # noqa: F811
    """Fails on a piece read from the wrong offset, a span dropped or a buffer grown to the tensor."""
    _, folder, doc, placements = sharded(name)
    for rank in range(TP):
        plain = SliceReader(folder)
        direct = {n: plain.read_tensor(n, e, dim, runs) for n, e, dim, runs, _ in _jobs(doc, placements, rank)}
        chunk = CHUNKS[name]
        cpu, meta = _Pieces(folder, stage=True, chunk_bytes=chunk, keep=False), _Pieces(folder, chunk_bytes=chunk)
        expected_pieces = 0
        for tname, entry, dim, runs, shape in _jobs(doc, placements, rank):
            stored = getattr(torch, entry["dtype"])
            target = torch.full(shape, -7.0, dtype=dtype or stored)
            cpu.read_into(target, tname, entry, dim, runs)
            assert torch.equal(target, direct[tname].to(target.dtype)), (rank, tname)
            start = len(meta.pieces)
            meta.read_into(torch.empty(shape, dtype=dtype or stored, device="meta"), tname, entry, dim, runs)
            hosts = [host.reshape(-1) for _, host in meta.pieces[start:]]
            assert all(h.dtype == stored for h in hosts)
            assert torch.equal(torch.cat(hosts), direct[tname].reshape(-1)), (rank, tname)
            expected_pieces += len(staging_spans(math.prod(shape), stored.itemsize, chunk))
        cpu.finish()
        meta.finish()
        assert len(meta.pieces) == len(cpu.pieces) == expected_pieces > 2 * len(direct)  # really in pieces
        assert cpu.largest == meta.largest == chunk  # never grown to a tensor
        assert cpu.bytes_read == meta.bytes_read == plain.bytes_read
        assert cpu.staging.buffers == [None, None]  # given back

"""The fast loader's batched reader (deferred `preadv` per file, in file order, on threads) fills every local
tensor with exactly the bytes the previous reader (one `readinto` per tensor, tests/legacy_slice_reader.py) did."""

from __future__ import annotations

import os

import pytest
import torch
from legacy_slice_reader import LegacySliceReader
from test_loading_device import _jobs, sharded  # noqa: F401 - `sharded` is a fixture

from tpcli.errors import CheckpointError
from tpcli.runtime import loading
from tpcli.runtime.loading import _SliceReader

TP = 2


def _fill(reader, folder, doc, placements, rank) -> dict:
    out = {}
    for name, entry, dim, runs, shape in _jobs(doc, placements, rank):
        out[name] = torch.empty(shape, dtype=getattr(torch, entry["dtype"]))
        reader.read_into(out[name], name, entry, dim, runs)
    reader.finish()
    return out


@pytest.mark.parametrize("name", ["qwen3", "mixtral"])  # tied embeddings; _StridedShard gate_up (several chunks)
@pytest.mark.parametrize("batch", [loading.READ_BATCH, 1])  # adjacent tensors in one preadv; one tensor per call
def test_batched_reader_equals_the_previous_reader(sharded, monkeypatch, name, batch):  # noqa: F811
    monkeypatch.setattr(loading, "READ_BATCH", batch)
    calls = []
    real = os.preadv

    def counted(fd, buffers, offset):
        calls.append(len(buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counted)
    _, folder, doc, placements = sharded(name)
    for rank in range(TP):
        old_reader, new_reader = LegacySliceReader(folder), _SliceReader(folder)
        old, new = _fill(old_reader, folder, doc, placements, rank), _fill(new_reader, folder, doc, placements, rank)
        assert new_reader.bytes_read == old_reader.bytes_read
        assert set(new) == set(old)
        for tname, t in old.items():
            assert torch.equal(new[tname], t), (rank, tname)
    assert calls, "the batched path was not taken"
    if batch > 1:
        assert max(calls) > 1  # adjacent tensors were read by one system call


def test_short_reads_are_continued(sharded, monkeypatch):  # noqa: F811
    """preadv may return fewer bytes than asked (signals, some file systems): the rest is read, nothing skipped."""
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: real(fd, [memoryview(buffers[0])[:7]], offset))
    _, folder, doc, placements = sharded("qwen3")
    old = _fill(LegacySliceReader(folder), folder, doc, placements, 0)
    new = _fill(_SliceReader(folder), folder, doc, placements, 0)
    assert all(torch.equal(new[n], t) for n, t in old.items())


def test_a_truncated_rank_file_is_an_error_naming_it(sharded, tmp_path):  # noqa: F811
    import shutil

    _, folder, doc, placements = sharded("qwen3")
    copy = tmp_path / "tp2"
    shutil.copytree(folder, copy)
    reader = _SliceReader(copy)
    for name, entry, dim, runs, shape in _jobs(doc, placements, 0):  # headers checked, reads queued
        reader.read_into(torch.empty(shape, dtype=getattr(torch, entry["dtype"])), name, entry, dim, runs)
    for rank_file in copy.glob("*.safetensors"):  # truncated between the header check and the reads
        os.truncate(rank_file, rank_file.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match=r"shard-\S+\.safetensors: truncated while reading"):
        reader.finish()

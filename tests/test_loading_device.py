"""The fast loader's device branch, proven without a GPU.

`tpcli.load_model` on a tpcli folder fills each rank's local tensors with `SliceReader.read_into`. On a GPU those
tensors live in device memory, which the host cannot read into (`.numpy()`/`readinto` of a CUDA tensor raise).
The `meta` device has no host memory either, so running the reader on meta targets proves every line of the
staged (device) branch runs without touching the target from the host; running the same staged branch on CPU
targets proves it reads the right bytes: equal to the host-direct path and to DTensor's own split of the original
checkpoint, with the same number of bytes read per rank.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import load_safetensors_dir

from tpcli.commands.inspect import load_resolved
from tpcli.commands.shard import shard_checkpoint
from tpcli.formats import manifest
from tpcli.planning.layout import rank_runs
from tpcli.runtime.fast_load import SliceReader

TP = 2


@pytest.fixture(scope="module")
def sharded(model_dirs, tmp_path_factory):
    """name -> (original folder, tp=2 tpcli folder, manifest, run-time placements from the plan)."""
    cache = {}

    def get(name):
        if name not in cache:
            src = model_dirs(name)
            out = tmp_path_factory.mktemp(f"{name}-tp{TP}")
            shard_checkpoint(str(src), tp=TP, out=str(out), force=True)
            _, plan = load_resolved(str(src))
            cache[name] = src, out, manifest.read(out), {n: t.placement for n, t in plan.tensors.items()}
        return cache[name]

    return get


def _jobs(doc, placements, rank):
    """(name, entry, dim, runs, local shape) of every tensor rank `rank` loads, as `_load_tpcli_shards` sees it."""
    for name, entry in doc["tensors"].items():
        if entry["tied_to"]:
            continue
        p = placements[name]
        runs = rank_runs(entry["shape"][p.dim], p, TP)[rank] if p.is_sharded else None
        yield name, entry, p.dim, runs, SliceReader._local_shape(entry, p.dim, runs)


class _Recording(SliceReader):
    """The staged path with its one device-touching step observed: what would be copied to each target."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.copies: list[tuple] = []

    def _to_target(self, out, host):
        self.copies.append((out, host.clone()))  # the staging buffer is reused: keep what it held now
        super()._to_target(out, host)


def _load(folder, doc, placements, rank, *, dtype=None, stage=False):
    """This rank's local tensors on CPU, the bytes read, and how many went through the staged copy."""
    reader = _Recording(folder, stage=stage)
    out = {}
    for name, entry, dim, runs, shape in _jobs(doc, placements, rank):
        out[name] = torch.empty(shape, dtype=dtype or getattr(torch, entry["dtype"]))
        reader.read_into(out[name], name, entry, dim, runs)
    reader.finish()
    return out, reader.bytes_read, len(reader.copies)


@pytest.mark.parametrize("name", ["qwen3", "mixtral"])  # tied embeddings; _StridedShard gate_up (several chunks)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])  # the stored dtype, and a cast on copy (dtype=)
def test_meta_targets_are_filled_only_through_host_staging(sharded, name, dtype):
    """Fails on a loader that reads into the target itself: meta tensors, like CUDA ones, have no host memory."""
    _, folder, doc, placements = sharded(name)
    for rank in range(TP):
        plain = SliceReader(folder)
        direct = {n: plain.read_tensor(n, e, dim, runs) for n, e, dim, runs, _ in _jobs(doc, placements, rank)}
        reader = _Recording(folder)
        for tname, entry, dim, runs, shape in _jobs(doc, placements, rank):
            target = torch.empty(shape, dtype=dtype or getattr(torch, entry["dtype"]), device="meta")
            reader.read_into(target, tname, entry, dim, runs)
            out, host = reader.copies[-1]
            assert out is target and target.device.type == "meta"
            assert host.device.type == "cpu" and host.dtype == getattr(torch, entry["dtype"])
            assert torch.equal(host, direct[tname]), (rank, tname)
        reader.finish()
        assert len(reader.copies) == len(direct)  # every tensor went through exactly one staged copy


@pytest.mark.parametrize("name", ["qwen3", "mixtral"])
def test_staged_path_reads_the_same_bytes_as_the_direct_path(sharded, name):
    src, folder, doc, placements = sharded(name)
    original = load_safetensors_dir(src) if name == "qwen3" else {}  # run-time names = checkpoint names here
    for rank in range(TP):
        direct, direct_bytes, direct_copies = _load(folder, doc, placements, rank)
        staged, staged_bytes, staged_copies = _load(folder, doc, placements, rank, stage=True)
        assert (direct_copies, staged_copies) == (0, len(direct))  # each path really taken
        assert staged_bytes == direct_bytes  # still only this rank's bytes, whatever the target
        assert direct_bytes < 0.62 * sum(f["bytes"] for f in doc["files"].values())
        for tname, t in direct.items():
            assert torch.equal(staged[tname], t), (rank, tname)
            if tname in original:  # the oracle: DTensor's own split of the original tensor
                p = placements[tname]
                full = original[tname]
                expect = full if not p.is_sharded else torch.cat(
                    [full.narrow(p.dim, a, b - a) for a, b in rank_runs(full.shape[p.dim], p, TP)[rank]], p.dim)
                assert torch.equal(t, expect), (rank, tname)
        cast, _, copies = _load(folder, doc, placements, rank, dtype=torch.bfloat16)  # staged, cast on copy
        assert copies == len(direct) and all(torch.equal(cast[n], t.to(torch.bfloat16)) for n, t in direct.items())


def test_loaded_tensors_own_their_bytes_whatever_happens_to_the_file(sharded, tmp_path):
    """Issue 23 item 4: no loaded tensor may share memory with the rank file (a private mapping follows the file for
    every page the process has not written: rewriting a file in place changed the numbers, truncating it was
    SIGBUS). Each tensor's storage is its own, and rewriting then truncating every file leaves the values as read."""
    import shutil

    _, original, doc, placements = sharded("qwen3")
    folder = tmp_path / "copy"
    shutil.copytree(original, folder)
    for rank in range(TP):
        expected, _, _ = _load(original, doc, placements, rank)
        reader = SliceReader(folder)
        loaded = {}
        for tname, entry, dim, runs, shape in _jobs(doc, placements, rank):
            loaded[tname] = target = torch.empty(shape, dtype=getattr(torch, entry["dtype"]))
            reader.read_into(target, tname, entry, dim, runs)
            assert target.untyped_storage().nbytes() == target.numel() * target.element_size(), tname
        reader.finish()
        for f in doc["files"]:
            path = folder / f
            path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))  # same inode, other bytes
        assert all(torch.equal(loaded[n], t) for n, t in expected.items()), rank
        for f in doc["files"]:
            os.truncate(folder / f, 0)
        assert all(torch.equal(loaded[n], t) for n, t in expected.items()), rank
        shutil.rmtree(folder)
        shutil.copytree(original, folder)


def test_unaligned_tensors_are_read(tmp_path):
    """A tensor whose file offset is not a multiple of its element size is read like any other."""
    import json
    import struct

    header = {"a": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [6, 14]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    a, b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16), torch.tensor([4.5, -1.25])
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + a.view(torch.uint8).numpy().tobytes()
                                             + b.view(torch.uint8).numpy().tobytes())
    reader = SliceReader(tmp_path)
    outs = {}
    for name, t in (("a", a), ("b", b)):
        entry = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                 "chunks": [{"file": "x.safetensors", "offsets": [0], "sizes": list(t.shape)}]}
        outs[name] = torch.empty(t.shape, dtype=t.dtype)
        reader.read_into(outs[name], name, entry, None, None)
    assert torch.equal(outs["a"], a) and torch.equal(outs["b"], b)
    assert reader.bytes_read == 14

"""The byte-moving fast path of shard and gather (`tpcli.formats.bytecopy`) against the general path and torch's slicing.

Where run-time tensors are checkpoint tensors as stored, shard and gather move bytes (kernel copies for long runs,
numpy strided copies for column splits) instead of reading tensors through transformers' converters. The oracle
is the general path, itself tested against transformers' own DCP save and TP load: both must write identical
files (same bytes, same sha256 in the manifest). `LONG=0` forces every box through the kernel-copy branch, a huge
LONG through the numpy branch, so both run on the tiny fixture models.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from pathlib import Path

import pytest
import torch

from tpcli.commands.gather import gather_checkpoint
from tpcli.commands.shard import shard_checkpoint
from tpcli.formats import bytecopy
from tpcli.formats.rankfile import box_run_starts


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


@pytest.fixture
def spy(monkeypatch):
    """How many times the byte path ran."""
    calls = []
    real = bytecopy.write_files
    monkeypatch.setattr(bytecopy, "write_files", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


BOXES = [  # (shape, offsets, sizes)
    ((6, 8), (0, 4), (6, 4)),  # column split: 6 runs
    ((6, 8), (3, 0), (3, 8)),  # row split: 1 run
    ((6, 8), (0, 0), (6, 8)),  # whole
    ((4, 6, 10), (0, 2, 0), (4, 2, 10)),  # dim 1 of a 3-D tensor: 4 runs
    ((4, 6, 10), (1, 0, 5), (2, 6, 5)),  # dims 0 and 2: 12 runs
    ((5,), (2,), (3,)),
    ((), (), ()),  # a scalar
    ((6, 8), (0, 8), (6, 0)),  # an empty chunk
]


@pytest.mark.parametrize("shape,offsets,sizes", BOXES)
def test_box_runs_are_the_bytes_of_the_torch_slice(shape, offsets, sizes):
    t = torch.arange(math.prod(shape), dtype=torch.int16).reshape(shape)
    raw = t.view(-1).view(torch.uint8).numpy().tobytes() if t.dim() else t.reshape(1).view(torch.uint8).numpy().tobytes()
    starts, n = box_run_starts(shape, offsets, sizes, 2)
    got = b"".join(raw[s:s + n] for s in starts)
    index = tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))
    want = t[index].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert got == want


@pytest.mark.parametrize("long", [0, 1 << 40], ids=["kernel-copy", "numpy"])
@pytest.mark.parametrize("name,tp", [("llama", 1), ("llama", 2), ("qwen3", 2), ("llama3", 3)])
def test_shard_and_gather_write_the_same_files_as_the_general_path(name, tp, long, model_dirs, tmp_path, spy,
                                                                 monkeypatch):
    monkeypatch.setattr(bytecopy, "LONG", long)
    src = model_dirs(name)
    fast = shard_checkpoint(str(src), tp=tp, out=str(tmp_path / "fast"))
    assert len(spy) == 1
    slow = shard_checkpoint(str(src), tp=tp, out=str(tmp_path / "slow"), byte_copy=False)
    assert len(spy) == 1  # the general path did not use it
    assert _digests(tmp_path / "fast") == _digests(tmp_path / "slow")  # rank files and tpcli.json (with the hashes)
    assert fast["files"] == slow["files"]
    for size in ("5GB", "60KB"):  # one file, and several files + index.json
        gather_checkpoint(fast["out"], out=str(tmp_path / f"g-fast-{size}"), max_shard_size=size)
        gather_checkpoint(fast["out"], out=str(tmp_path / f"g-slow-{size}"), max_shard_size=size, byte_copy=False)
        assert _digests(tmp_path / f"g-fast-{size}") == _digests(tmp_path / f"g-slow-{size}")
    assert len(spy) == 3
    assert len(list((tmp_path / "g-fast-60KB").glob("*.safetensors"))) > 1


@pytest.mark.dist
def test_gather_of_transformers_own_dcp_save_moves_bytes_too(oracle, tmp_path, spy):
    dcp = oracle("qwen3", 2) / "dcp"
    gather_checkpoint(str(dcp), out=str(tmp_path / "fast"))
    gather_checkpoint(str(dcp), out=str(tmp_path / "slow"), byte_copy=False)
    assert len(spy) == 1 and _digests(tmp_path / "fast") == _digests(tmp_path / "slow")


def test_conversions_and_casts_take_the_general_path(model_dirs, tmp_path, spy):
    shard_checkpoint(str(model_dirs("mixtral")), tp=2, out=str(tmp_path / "moe"))  # per-expert w1/w3 -> fused
    shard_checkpoint(str(model_dirs("llama")), tp=2, out=str(tmp_path / "cast"), dtype="bf16")
    assert spy == []
    gather_checkpoint(str(tmp_path / "moe"), out=str(tmp_path / "moe-merged"))  # reverted to per-expert names
    gather_checkpoint(str(tmp_path / "cast"), out=str(tmp_path / "cast-fp32"), dtype="fp32")
    assert spy == []


def test_a_failing_write_stops_every_file_and_names_it(model_dirs, tmp_path, monkeypatch):
    """A write error on one rank file surfaces as an OSError naming that file; the other threads stop."""
    import errno

    from tpcli.formats import tensor_file

    real = tensor_file.write_at
    seen = []

    def write_at(f, data, pos):
        seen.append(Path(f.name).name)
        if Path(f.name).name.startswith("shard-00002"):
            raise OSError(errno.EIO, "Input/output error")
        return real(f, data, pos)

    monkeypatch.setattr(tensor_file, "write_at", write_at)
    with pytest.raises(OSError, match="shard-00002") as exc:
        shard_checkpoint(str(model_dirs("llama")), tp=2, out=str(tmp_path / "o"))
    assert exc.value.errno == errno.EIO
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []  # the temporary folder is gone


def test_box_runs_cover_every_chunk_of_every_tp_exactly_once():
    """For each placement the layout uses, the runs of all ranks' chunks tile the tensor's bytes exactly once."""
    from tpcli.planning.layout import contiguous_chunk
    from tpcli.planning.placements import ParamPlacement

    shape = (6, 10, 4)
    for tp, dim in itertools.product((1, 2, 3, 4), range(3)):
        covered = bytearray(math.prod(shape))
        for r in range(tp):
            offsets, sizes = contiguous_chunk(shape, ParamPlacement("shard", dim), tp, r)
            starts, n = box_run_starts(shape, tuple(offsets), tuple(sizes), 1)
            for s in starts:
                covered[s:s + n] = bytes(b + 1 for b in covered[s:s + n])
        assert set(covered) == {1}, (tp, dim)

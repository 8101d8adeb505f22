"""The one reader of safetensors files (`tpcli.formats.rankfile.RankFile`), against safetensors' own reader.

Every header bound is refused with one line naming the file (and the tensor); byte ranges and sub-boxes equal what
`safe_open(...).get_slice` returns; a staged read (to CPU, to `meta`, cast on copy) equals a direct one; reads never
leave the tensor's bytes; a file that shrinks after it was opened is named, not mapped past its end. The commands
that read through it (verify, gather, shard, reshard, load_model) are tested end to end elsewhere
(test_bad_input.py keeps three header cases through the CLI: the one-line rendering).
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tpcli.errors import CheckpointError
from tpcli.formats.rankfile import MAX_HEADER, RankFile, box_byte_runs
from tpcli.formats.staging import Staging


@pytest.fixture
def good(tmp_path):
    """A small safetensors file: a 3-D bf16 tensor, a 2-D fp32 one, a 1-D int8 one (save_file: the library's own)."""
    g = torch.Generator().manual_seed(0)
    tensors = {"model.a.weight": torch.randn(5, 7, 3, generator=g).to(torch.bfloat16),
               "model.b.weight": torch.randn(6, 9, generator=g),
               "model.c.bias": torch.randint(-100, 100, (11,), generator=g, dtype=torch.int8)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def _split(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header, data: bytes, pad: bool = True) -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _by_offset(header):
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _edit(fn):
    """A breakage: `fn(header, names by offset)` edits the header; the data bytes stay."""
    def apply(path):
        header, data = _split(path)
        fn(header, _by_offset(header))
        path.write_bytes(_join(header, data))
    return apply


def _raw(fn):
    def apply(path):
        path.write_bytes(fn(path.read_bytes()))
    return apply


def _set(key, value, i=0):
    return _edit(lambda h, o: h[o[i]].__setitem__(key, value))


def _shift_last(h, o):
    b, e = h[o[-1]]["data_offsets"]
    h[o[-1]]["data_offsets"] = [b + 8, e + 8]


BOUNDS = {  # breakage -> words the one-line error must hold (besides the file's path)
    "no-header": (_raw(lambda b: b[:5]), ["truncated (5 bytes, no safetensors header)"]),
    "header-length-absurd": (_raw(lambda b: struct.pack("<Q", MAX_HEADER + 1) + b[8:]), ["header length", "limit"]),
    "header-length-past-end": (_raw(lambda b: struct.pack("<Q", len(b)) + b[8:]), ["runs past the end of the file"]),
    "not-json": (_raw(lambda b: _join(b"{not json", b"")), ["not JSON"]),
    "not-an-object": (_raw(lambda b: _join([1, 2], b"")), ["not a JSON object"]),
    "metadata-not-strings": (_edit(lambda h, o: h.__setitem__("__metadata__", {"format": 1})), ["__metadata__",
                                                                                                 "'format' is int"]),
    "entry-not-object": (_edit(lambda h, o: h.__setitem__(o[0], [1])), ["not an object"]),
    "unknown-dtype": (_set("dtype", "F33"), ["F33"]),
    "shape-not-counts": (_set("shape", "5x7x3"), ["shape", "not a list of non-negative integers"]),
    "shape-bool": (_set("shape", [True, 7, 3]), ["shape", "not a list"]),
    "offsets-missing": (_edit(lambda h, o: h[o[0]].pop("data_offsets")), ["data_offsets", "missing"]),
    "offsets-reversed": (_edit(lambda h, o: h[o[0]].__setitem__("data_offsets", h[o[0]]["data_offsets"][::-1])),
                         ["reversed"]),
    "size-mismatch": (_set("shape", [3]), ["needs", "data_offsets span"]),
    "overlap": (_edit(lambda h, o: h[o[1]].__setitem__("data_offsets", [h[o[1]]["data_offsets"][0] - 2,
                                                                         h[o[1]]["data_offsets"][1] - 2])),
                ["overlap tensor"]),
    "gap-then-past-end": (_edit(_shift_last), ["leaving a gap"]),
    "data-truncated": (_raw(lambda b: b[:-3]), ["truncated (", "runs past the end"]),
    "bytes-after-last": (_raw(lambda b: b + b"\0" * 8), ["8 bytes after the last tensor"]),
}
NAMED = {"entry-not-object", "unknown-dtype", "shape-not-counts", "shape-bool", "offsets-missing", "offsets-reversed",
         "size-mismatch", "overlap", "gap-then-past-end"}


@pytest.mark.parametrize("case", sorted(BOUNDS))
def test_each_header_bound_is_refused_in_one_line(good, case):
    path, _ = good
    RankFile(path).close()  # the unbroken file opens: the breakage, not the fixture, is refused below
    breakage, words = BOUNDS[case]
    breakage(path)
    with pytest.raises(CheckpointError) as err:
        RankFile(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert all(w in message for w in words), message
    if case in NAMED:  # a bad entry: the tensor is named too
        assert ": tensor model." in message, message


def test_state_names_are_printable_ascii_words_for_rank_files(good):
    path, tensors = good
    save_file({"model.norm.²": tensors["model.c.bias"]}, str(path))
    RankFile(path).close()  # a checkpoint's weights: any name the library accepts
    with pytest.raises(CheckpointError, match="is not a name a model's state dict has"):
        RankFile(path, "rank files", state_names=True)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_only_regular_files_are_opened(tmp_path, kind):
    path = tmp_path / "x.safetensors"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()  # a FIFO would block open() forever
    with pytest.raises(CheckpointError, match="FIFO" if kind == "fifo" else "a directory"):
        RankFile(path)


BOXES = [((0, 0, 0), (5, 7, 3)), ((1, 0, 0), (3, 7, 3)), ((0, 2, 0), (5, 5, 3)), ((2, 3, 1), (4, 6, 2)),
         ((4, 6, 2), (5, 7, 3)), ((2, 0, 0), (2, 7, 3))]


@pytest.mark.parametrize("lo,hi", BOXES)
def test_a_box_read_equals_safetensors_get_slice(good, lo, hi):
    path, _ = good
    name = "model.a.weight"
    with safe_open(str(path), framework="pt") as f:
        expected = f.get_slice(name)[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    out = torch.full([b - a for a, b in zip(lo, hi, strict=True)], -3.0, dtype=torch.bfloat16)
    with RankFile(path) as rf:
        assert rf.read_box_into(name, list(lo), list(hi), out) == expected.numel() * 2
    assert torch.equal(out, expected)


def test_byte_ranges_and_mapped_views_equal_the_library(good):
    path, tensors = good
    with RankFile(path) as rf, safe_open(str(path), framework="pt") as f:
        for name in tensors:
            whole = f.get_tensor(name).reshape(-1).view(torch.uint8)
            e = rf.entry(name)
            assert rf.offset(name) == e.begin and e.nbytes == whole.numel() and rf.spans()[name] == (e.begin, e.end)
            part = torch.empty(e.nbytes - 3, dtype=torch.uint8)
            rf.read_range_into(name, 2, part)
            assert torch.equal(part, whole[2:-1])
            assert rf.read_bytes(name, 1, 4) == bytes(whole[1:5].tolist())
            m = rf.map_range(e.begin, e.end)
            assert bytes(m.view(e.begin + 1, 4)) == bytes(whole[1:5].tolist())
            m.close()
            assert torch.equal(rf.get_tensor(name), tensors[name])


def test_box_byte_runs_examples():
    assert box_byte_runs([4, 6], [1, 2], [3, 5], 1) == [(8, 3), (14, 3)]
    assert box_byte_runs([4, 6], [1, 0], [3, 6], 2) == [(12, 24)]  # a row block: one run
    assert box_byte_runs([], [], [], 4) == [(0, 4)] and box_byte_runs([4, 6], [1, 2], [1, 5], 1) == []


@pytest.mark.parametrize("target", ["cpu", "cast", "meta"])
def test_a_staged_read_equals_a_direct_one(good, target):
    """Staged in pieces of 10 bytes (edges inside elements' rows) through two buffers: the same values as one
    direct pread, cast on copy when the target's dtype differs; a meta target is filled without host access."""
    path, _ = good
    name = "model.b.weight"
    copies = []

    def to_target(part, host):
        copies.append(host.clone())
        part.copy_(host)

    with RankFile(path) as rf:
        direct = torch.empty(40, dtype=torch.float32)
        rf.read_run_to(name, 8, direct)  # elements 2..41 of the 54
        dtype = torch.bfloat16 if target == "cast" else torch.float32
        out = torch.empty(40, dtype=dtype, device="meta" if target == "meta" else "cpu")
        staging = Staging(chunk_bytes=10)
        rf.read_run_to(name, 8, out, staging, to_target)
        staging.release()
    assert len(copies) == 20 and all(c.numel() <= 2 for c in copies)  # really in pieces of one buffer each
    assert torch.equal(torch.cat(copies), direct)
    if target != "meta":
        assert torch.equal(out, direct.to(dtype))


def test_reads_stay_inside_the_tensor_and_in_host_memory(good):
    path, _ = good
    name = "model.c.bias"  # 11 bytes
    with RankFile(path) as rf:
        part = torch.empty(7, dtype=torch.uint8)
        rf.read_range_into(name, 4, part)
        for start, out in ((5, part), (-1, part), (0, torch.empty(2, dtype=torch.float32))):
            with pytest.raises(ValueError, match="read_range_into"):
                rf.read_range_into(name, start, out)
        with pytest.raises(ValueError, match="read_bytes"):
            rf.read_bytes(name, 8, 4)
        with pytest.raises(ValueError, match="not inside its shape"):
            rf.read_box_into(name, [3], [12], torch.empty(9, dtype=torch.int8))
        with pytest.raises(ValueError, match="needs a contiguous CPU tensor"):
            rf.read_into(name, torch.empty(11, dtype=torch.int8, device="meta"))


def test_a_file_that_shrinks_after_opening_is_named_not_mapped(good):
    path, _ = good
    with RankFile(path) as rf:
        end = rf.size
        os.truncate(path, end // 2)
        with pytest.raises(CheckpointError, match="changed while being read") as err:
            rf.map_range(rf.data_start, end)
        assert str(err.value).startswith(f"{path}: is now {end // 2:,} bytes")
        last = max(rf.keys(), key=lambda n: rf.entry(n).end)  # its bytes are past the new end
        with pytest.raises(CheckpointError, match="truncated while reading"):
            rf.read_bytes(last, 0, rf.entry(last).nbytes)


def test_a_link_swapped_out_of_the_folder_after_the_check_is_refused(good, tmp_path, monkeypatch):
    """The inside-the-folder check is proven on the opened descriptor: a rank file that is a link inside the folder
    when checked, re-pointed outside just before `open` (the race a path check alone loses), is refused."""
    import tpcli.formats.rankfile as rankfile

    path, _ = good
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "real.safetensors").write_bytes(path.read_bytes())
    link = folder / "shard.safetensors"
    link.symlink_to(folder / "real.safetensors")
    RankFile(link, "rank files", folder=folder).close()  # inside: opened
    real_open = os.open

    def swap_then_open(p, *a, **k):  # the link now points at the file outside the folder
        link.unlink()
        link.symlink_to(path)
        return real_open(p, *a, **k)

    monkeypatch.setattr(rankfile.os, "open", swap_then_open)
    with pytest.raises(CheckpointError, match=f"resolves to {path}, outside {folder}; rank files must live inside"):
        RankFile(link, "rank files", folder=folder)

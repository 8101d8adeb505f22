"""A training-state folder from someone else (issue 34, items 1-3): `optimizer/.metadata` is a pickle whose sha256
in tpcli-state.json anyone can refresh (the manifest is not signed). Each forged folder below has its manifest
refreshed, so only the checks on the metadata itself stand between it and the reader: `tpcli verify STATE` and
`tpcli.load_state` must refuse it in one line naming the file, run no code, read nothing outside the listed files,
change no parameter, and finish in bounded time."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import time
from pathlib import Path

import pytest
from conftest import run_main
from test_state import _fresh_copy, _model_and_optimizer, _refused, _step

from tpcli.errors import CheckpointError

OPT_FILE = "__0_0.distcp"  # the one process's optimizer file


@pytest.fixture(scope="module")
def saved(model_dirs, tmp_path_factory) -> Path:
    """A state saved in one process after 2 AdamW steps (llama4kv, as test_state's)."""
    import tpcli

    model, opt = _model_and_optimizer(model_dirs("llama4kv"))
    _step(model, opt, 0)
    _step(model, opt, 1)
    return tpcli.save_state(tmp_path_factory.mktemp("s") / "step-2", model, opt, step=2)


def _refresh(state: Path) -> None:
    """Rewrite tpcli-state.json's size and sha256 of every listed file, as an attacker would."""
    doc = json.loads((state / "tpcli-state.json").read_text())
    for name in doc["files"]:
        data = (state / name).read_bytes()
        doc["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (state / "tpcli-state.json").write_text(json.dumps(doc))


def _real_metadata(state: Path):
    with open(state / "optimizer" / ".metadata", "rb") as f:  # the test's own file: a plain unpickle is fine here
        return pickle.load(f)


def _write_metadata(state: Path, meta) -> None:
    (state / "optimizer" / ".metadata").write_bytes(pickle.dumps(meta, protocol=4))
    _refresh(state)


def _short_str(s: str) -> bytes:
    raw = s.encode()
    return b"\x8c" + struct.pack("<B", len(raw)) + raw  # SHORT_BINUNICODE


def forged(real: bytes, command: str) -> bytes:
    """The real metadata pickle behind a prefix that calls os.system(command) and drops its result: STACK_GLOBAL
    of ('torch.distributed.checkpoint.filesystem', 'os.system'), which protocol 4 resolves through the module's
    `os` attribute. No MEMOIZE in the prefix, so the real pickle's memo indices still hold."""
    assert real[:2] == b"\x80\x04"
    prefix = (_short_str("torch.distributed.checkpoint.filesystem") + _short_str("os.system") + b"\x93"  # STACK_GLOBAL
              + _short_str(command) + b"\x85" + b"R" + b"0")  # TUPLE1, REDUCE, POP
    return b"\x80\x04" + prefix + real[2:]


def _one_line_refusal(monkeypatch, capsys, state: Path, match: str) -> str:
    code, out, _ = run_main(monkeypatch, capsys, "verify", state, "--json")
    r = json.loads(out)
    assert code == 1 and not r["ok"], r
    message = r["findings"][0]["message"]
    assert match in message and "\n" not in message, message
    return message


# --- item 1: no code from .metadata -----------------------------------------------------------------------------

def test_a_forged_metadata_pickle_runs_no_code_in_verify_or_load_state(monkeypatch, capsys, model_dirs,
                                                                      saved, tmp_path):
    state = _fresh_copy(saved, tmp_path)
    real = (state / "optimizer" / ".metadata").read_bytes()
    oracle_marker = tmp_path / "oracle-ran"  # the forgery works: a plain unpickle runs it and still gets Metadata
    meta = pickle.loads(forged(real, f"touch {oracle_marker}"))
    assert oracle_marker.exists() and type(meta).__name__ == "Metadata"

    marker = tmp_path / "pwned"
    (state / "optimizer" / ".metadata").write_bytes(forged(real, f"touch {marker}"))
    _refresh(state)
    message = _one_line_refusal(monkeypatch, capsys, state, "torch.distributed.checkpoint.filesystem.os.system")
    assert message.startswith(str(state / "optimizer" / ".metadata")), message
    assert not marker.exists()
    _refused(model_dirs, state, r"\.metadata: not DCP metadata .*os\.system")
    assert not marker.exists()
    # Shown to fail on b3d4079: its unpickler allowed any name not starting with "__" from that module, verify said
    # ok and `marker` existed afterwards.


@pytest.mark.parametrize("module, name", [("torch.distributed.checkpoint.metadata", "Metadata.__init__"),
                                          ("torch.distributed.checkpoint.metadata", "torch"),
                                          ("builtins", "eval"), ("torch", "load"), ("pathlib", "Path")])
def test_only_the_exact_allow_list_resolves(tmp_path, module, name):
    from tpcli.formats.dcp_metadata import read_metadata

    (tmp_path / ".metadata").write_bytes(b"\x80\x04" + _short_str(module) + _short_str(name) + b"\x93.")
    with pytest.raises(CheckpointError, match=f"not DCP metadata .*{module}.{name}, which is not part"):
        read_metadata(tmp_path)


def _global(module: str, name: str) -> bytes:
    return _short_str(module) + _short_str(name) + b"\x93"  # STACK_GLOBAL


@pytest.mark.parametrize("target", ["class", "enum-member"])
def test_a_pickle_cannot_change_the_classes_it_may_build(tmp_path, target):
    """BUILD on an allowed global (slot state: setattr on a class; dict state: an enum member's __dict__) would
    change it for the whole process (every later load, the training itself): refused, and put back."""
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING, MetadataIndex

    from tpcli.formats.dcp_metadata import read_metadata

    meta = "torch.distributed.checkpoint.metadata"
    if target == "class":  # MetadataIndex.planted = True
        body = _global(meta, "MetadataIndex") + b"N}" + _short_str("planted") + b"\x88s\x86b"
        where = "MetadataIndex.planted"
    else:  # _MEM_FORMAT_ENCODING(0)._value_ = 5
        body = _global(meta, "_MEM_FORMAT_ENCODING") + b"K\x00\x85R}" + _short_str("_value_") + b"K\x05sb"
        where = "_MEM_FORMAT_ENCODING._value_"
    (tmp_path / ".metadata").write_bytes(b"\x80\x04" + body + b".")
    with pytest.raises(CheckpointError, match=f"not DCP metadata \\(it sets {where} of a class or constant"):
        read_metadata(tmp_path)
    assert not hasattr(MetadataIndex, "planted") and _MEM_FORMAT_ENCODING(0)._value_ == 0


def test_an_oversized_metadata_is_refused_before_unpickling(tmp_path):
    from tpcli.formats.dcp_metadata import read_metadata

    (tmp_path / ".metadata").write_bytes(b"\x80\x04" + b"N" * 4096 + b".")
    with pytest.raises(CheckpointError, match=r"4,099 bytes, more than DCP metadata needs .*\(4,096\)"):
        read_metadata(tmp_path, limit=4096)


# --- item 2: nothing read outside the listed files -------------------------------------------------------------

def _repoint(state: Path, fqn_end: str, **change):
    """The storage entry of the first chunk whose name ends with `fqn_end`, changed (relative_path, offset, ...)."""
    from dataclasses import replace

    meta = _real_metadata(state)
    key = next(k for k in meta.storage_data if k.fqn.endswith(fqn_end))
    meta.storage_data[key] = replace(meta.storage_data[key], **change)
    _write_metadata(state, meta)
    return key.fqn


@pytest.mark.parametrize("where", ["absolute", "dotdot", "fifo", "truncated"])
def test_metadata_pointing_outside_the_listed_files_is_refused(monkeypatch, capsys, model_dirs, saved,
                                                               tmp_path, where):
    state = _fresh_copy(saved, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(state / "optimizer" / OPT_FILE, outside / OPT_FILE)  # readable as the real one: a silent swap
    if where == "absolute":
        _repoint(state, "model.norm.weight.exp_avg", relative_path=str(outside / OPT_FILE))
        match = "not a file of"
    elif where == "dotdot":
        shutil.copy(state / "optimizer" / OPT_FILE, state / "elsewhere.distcp")
        _repoint(state, "model.norm.weight.exp_avg", relative_path="../elsewhere.distcp")
        match = "not a file of"
    elif where == "fifo":  # reading it would wait forever on every rank
        os.mkfifo(outside / "fifo")
        _repoint(state, "model.norm.weight.exp_avg", relative_path=str(outside / "fifo"))
        match = "not a file of"
    else:  # the last bytes cut off, the manifest refreshed: load_state died in torch with EOFError
        victim = state / "optimizer" / OPT_FILE
        victim.write_bytes(victim.read_bytes()[:-100])
        _refresh(state)
        match = "the file is truncated or the metadata corrupt"
    message = _one_line_refusal(monkeypatch, capsys, state, match)
    assert str(state) in message
    _refused(model_dirs, state, match)
    # Shown to fail on b3d4079: verify said ok with hashes checked for all four; load_state read the outside file
    # (absolute, dotdot), hung (fifo) or raised EOFError from torch (truncated).


def test_overlapping_byte_ranges_and_missing_entries_are_refused(monkeypatch, capsys, saved, tmp_path):
    state = _fresh_copy(saved, tmp_path)
    meta = _real_metadata(state)
    first = min(meta.storage_data.values(), key=lambda i: i.offset)
    _repoint(state, "model.norm.weight.exp_avg", offset=first.offset)
    _one_line_refusal(monkeypatch, capsys, state, "overlap those of")
    state = _fresh_copy(saved, tmp_path / "missing")
    meta = _real_metadata(state)
    del meta.storage_data[next(k for k in meta.storage_data if k.fqn.endswith("model.norm.weight.exp_avg"))]
    _write_metadata(state, meta)
    _one_line_refusal(monkeypatch, capsys, state, "has no stored bytes for its chunk at [0]")


# --- item 3: bounded work on many chunks -----------------------------------------------------------------------

def _many_chunks(state: Path, *, duplicate: bool) -> int:
    """embed_tokens' exp_avg ([1001, 64]) as 16,016 chunks of [1, 4], each one byte of the old entry's range."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    meta = _real_metadata(state)
    fqn = next(k for k in meta.state_dict_metadata if k.endswith("model.embed_tokens.weight.exp_avg"))
    old = meta.storage_data.pop(MetadataIndex(fqn, torch.Size([0, 0])))
    chunks = [ChunkStorageMetadata(offsets=torch.Size([r, c]), sizes=torch.Size([1, 4]))
              for r in range(1001) for c in range(0, 64, 4)]
    if duplicate:
        chunks[-1] = ChunkStorageMetadata(offsets=torch.Size([500, 0]), sizes=torch.Size([1, 4]))
    meta.state_dict_metadata[fqn].chunks = chunks
    for k, c in enumerate(chunks):
        meta.storage_data[MetadataIndex(fqn, c.offsets)] = _StorageInfo(old.relative_path, old.offset + k, 1)
    assert len(chunks) <= old.length
    _write_metadata(state, meta)
    return len(chunks)


def test_sixteen_thousand_chunks_verify_in_bounded_time(monkeypatch, capsys, saved, tmp_path):
    """The pairwise overlap test took ~250 s on 16,000 chunks; the sweep well under a second (10 s allowed)."""
    state = _fresh_copy(saved, tmp_path)
    assert _many_chunks(state, duplicate=False) == 16_016
    started = time.perf_counter()
    code, out, _ = run_main(monkeypatch, capsys, "verify", state, "--json", "--quick")
    assert time.perf_counter() - started < 10
    assert code == 0 and json.loads(out)["ok"], out  # the chunks do tile the tensor
    state = _fresh_copy(saved, tmp_path / "dup")
    _many_chunks(state, duplicate=True)
    started = time.perf_counter()
    _one_line_refusal(monkeypatch, capsys, state, "model.embed_tokens.weight.exp_avg lists a chunk twice")
    assert time.perf_counter() - started < 10


# --- red team: unpickling work bounded by the file ------------------------------------------------------------

def _hash_bomb(levels: int = 12, width: int = 16) -> bytes:
    """~430 bytes: tuples of `width` memoised copies of the tuple below, `levels` deep, as a dict key (hash
    visits width^levels elements: tuples do not cache their hash)."""
    body = b"(" + b"K\x01" * width + b"t\x94"
    for k in range(1, levels):
        body += b"(" + (b"h" + bytes([k - 1])) * width + b"t\x94"
    return b"\x80\x04" + body + b"}(h" + bytes([levels - 1]) + b"Nu."


def _int_flood(n: int = 60_000) -> bytes:
    """A dict of n int keys that all hash alike (k * (2^61 - 1): int hashes are not randomised): n^2/2 compares."""
    keys = b"".join(b"\x8a\x0a" + (k * (2**61 - 1)).to_bytes(10, "little", signed=True) + b"N" for k in range(1, n))
    return b"\x80\x04}(" + keys + b"u."


def _enum_bomb() -> bytes:
    """_MEM_FORMAT_ENCODING(value) with the hash bomb as value: the enum's lookup hashes it."""
    bomb = _hash_bomb()[2:-6]  # the memoised tuples, without the dict
    return (b"\x80\x04" + bomb + _global("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING")
            + b"h\x0b\x85R.")


@pytest.mark.e2e
def test_crafted_pickles_cost_work_proportional_to_their_bytes(tmp_path):
    """Three .metadata files of a few hundred bytes to 1 MB that took hours (hash of nested memoised tuples as a
    dict key or an enum's value; colliding int keys): each refused in a child process within its time limit."""
    import subprocess
    import sys

    for name, data in {"tuple-key": _hash_bomb(), "int-keys": _int_flood(), "enum-value": _enum_bomb()}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / ".metadata").write_bytes(data)
    code = ("import sys\nfrom tpcli.formats.dcp_metadata import read_metadata\nfrom tpcli.errors import "
            "CheckpointError\nfor d in sys.argv[1:]:\n    try:\n        read_metadata(d)\n    except "
            "CheckpointError as e:\n        print(e)\n")
    names = ["tuple-key", "int-keys", "enum-value"]
    out = subprocess.run([sys.executable, "-c", code, *(str(tmp_path / n) for n in names)], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.splitlines()
    assert [line.split("/")[-2] for line in out] == names, out
    assert "a dict key is a tuple" in out[0] and "a dict key is a int" in out[1]
    assert "a call has arguments of more than 4096 elements" in out[2]


def _zip_bomb(n: int) -> bytes:
    """torch.save of a 16-byte tensor whose pickle declares n bytes and whose data member holds n zero bytes,
    deflated (~n / 1000 bytes): torch.load(weights_only=True) inflates it and returns an n-byte tensor."""
    import io
    import zipfile

    import torch

    buf = io.BytesIO()
    torch.save(torch.zeros(16, dtype=torch.uint8), buf)
    real = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as w:
        for name in real.namelist():
            data = real.read(name)
            if name.endswith("data.pkl"):
                data = data.replace(b"K\x10t", b"J" + n.to_bytes(4, "little") + b"t", 1).replace(
                    b"K\x10\x85", b"J" + n.to_bytes(4, "little") + b"\x85", 1)
            kind = zipfile.ZIP_DEFLATED if name.endswith("data/0") else zipfile.ZIP_STORED
            w.writestr(zipfile.ZipInfo(name), bytes(n) if name.endswith("data/0") else data, compress_type=kind)
    return out.getvalue()


def test_a_compressed_value_is_refused_before_torch_inflates_it(monkeypatch, capsys, model_dirs, saved, tmp_path):
    """An optimizer value (lr) replaced by a deflated torch.save archive: 64 KB that torch.load(weights_only=True)
    inflated to a 64 MiB tensor on every rank (231 such values in this state: 1 MB each would be 231 GiB).
    Refused by verify and by load_state before anything loads."""
    import io

    import torch

    bomb = _zip_bomb(64 << 20)
    assert len(bomb) < 100_000 and torch.load(io.BytesIO(bomb), weights_only=True).numel() == 64 << 20
    state, fqn = _plant_value(saved, tmp_path, bomb)
    match = "is not a torch.save archive of stored members"
    assert fqn in _one_line_refusal(monkeypatch, capsys, state, match)
    _refused(model_dirs, state, match)


def _plant_value(saved, tmp_path, payload: bytes):
    """A fresh copy of the saved state whose first non-tensor optimizer value (lr, betas, ...) is `payload`,
    appended to an optimizer file and pointed at by .metadata: (the state folder, that value's fqn)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    state = _fresh_copy(saved, tmp_path)
    victim = state / "optimizer" / OPT_FILE
    start = victim.stat().st_size
    with open(victim, "ab") as f:
        f.write(payload)
    meta = _real_metadata(state)
    fqn = next(k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    _repoint(state, fqn, offset=start, length=len(payload))
    return state, fqn


def _value_archive(pickled: bytes) -> bytes:
    """torch.save(1.0)'s archive with its data.pkl replaced (stored, as torch writes it)."""
    import io
    import zipfile

    import torch

    buf = io.BytesIO()
    torch.save(1.0, buf)
    real = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as w:
        for name in real.namelist():
            w.writestr(zipfile.ZipInfo(name), pickled if name.endswith("data.pkl") else real.read(name))
    return out.getvalue()


def test_a_value_pickle_of_nested_copies_is_refused_before_torch_hashes_it(monkeypatch, capsys, model_dirs, saved,
                                                                          tmp_path):
    """A ~1 KB value whose pickle (protocol 2, opcodes torch's weights-only unpickler accepts) uses a 12-deep
    tuple of 16 memoised copies as a dict key: torch.load(weights_only=True) hashed 16^12 elements, so load_state
    hung on every rank (verify said ok). Refused by verify and load_state."""

    body = b"(" + b"K\x01" * 16 + b"tq\x00"
    for k in range(1, 12):
        body += b"(" + (b"h" + bytes([k - 1])) * 16 + b"tq" + bytes([k])
    bomb = _value_archive(b"\x80\x02" + body + b"}(h\x0bNu.")
    state, fqn = _plant_value(saved, tmp_path, bomb)
    match = "is a pickle that refers back to what it built"
    assert fqn in _one_line_refusal(monkeypatch, capsys, state, match)
    _refused(model_dirs, state, match)


def test_a_chunk_repeated_by_memo_is_refused_before_the_later_checks(monkeypatch, capsys, saved, tmp_path):
    """One chunk listed 3,000,000 times costs the pickle 2 bytes each (6 MB): every later check (types, storage
    keys, the tiling's arrays) spent time and memory on each copy (verify: 23 s). Refused by the structure check."""
    import time

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    state = _fresh_copy(saved, tmp_path)
    meta = _real_metadata(state)
    fqn, m = next((k, v) for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
                  and len(v.size) == 2)
    m.chunks = m.chunks * 3_000_000
    _write_metadata(state, meta)
    started = time.perf_counter()
    assert fqn in _one_line_refusal(monkeypatch, capsys, state, "lists a chunk twice")
    assert time.perf_counter() - started < 15


def test_a_repeated_chunk_is_refused_at_its_first_copy(saved):
    """The structure check stops at the first repeat, before it visits the copies after it (3,000,000 memo GETs of
    one chunk cost it ~1.3 s per read of the metadata when the repeat was counted after the loop): here a malformed
    chunk after the repeat is never reached."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from tpcli.formats.dcp_metadata import check_structure

    meta = _real_metadata(saved)
    fqn, m = next((k, v) for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata))
    m.chunks = [m.chunks[0], m.chunks[0], "not a chunk"]
    with pytest.raises(CheckpointError, match=f"entry {fqn} lists a chunk twice"):
        check_structure(saved / "optimizer" / ".metadata", meta)

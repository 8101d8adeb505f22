"""The caches can make tpcli faster, never wrong and never a way in (issue 23 items 1-3).

* a planted shard-layout entry (rank file `../../x`, a source outside the model) never writes outside --out: in a
  folder others can write the cache is not used at all (said once), and in a private one the entry is validated;
* an entry missing a field is a miss, not a KeyError;
* the key names the bytes: a `cur -> A` link flipped to a same-size, same-mtime copy B misses, and so does a header
  rewritten at the same size with its mtime put back;
* the folder is created 0700 and the number of entries is bounded.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import run_main

from tpcli.formats import cache


@pytest.fixture
def env(model_dirs, tmp_path, monkeypatch):
    """A private copy of the tiny llama (single file) and the cache on in tmp_path/cache."""
    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_warned", set(), raising=False)  # "said once" per test
    folder = tmp_path / "A"
    subprocess.run(["cp", "-a", str(model_dirs("llama3")), str(folder)], check=True)
    return folder, tmp_path / "cache"


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json"))


def _rewrite(entry_file: Path, edit) -> None:
    """Edit a stored result and store it consistently (its digest too): what a planter with write access can do."""
    entry = json.loads(entry_file.read_text())
    edit(entry["result"])
    entry["digest"] = hashlib.sha256(json.dumps(entry["result"], sort_keys=True).encode()).hexdigest()  # cache.digest
    entry_file.write_text(json.dumps(entry))


def _plant_escape(result: dict, secret: Path) -> None:
    """The rank-0 file becomes `../../pwned.txt`, its first box reads `secret` (issue 23 item 1)."""
    from tpcli.formats.byteplan import header_digest

    plan = result["plan"]
    plan["files"][0]["name"] = "../../pwned.txt"
    plan["headers"][str(secret)] = header_digest(secret)
    plan["files"][0]["tensors"][0]["boxes"][0][0] = str(secret)


def _shard(monkeypatch, capsys, model, out, *more):
    return run_main(monkeypatch, capsys, "shard", model, "--tp", "2", "--out", out, *more)


def _rank_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.safetensors"))}


@pytest.mark.parametrize("folder_mode", ["shared-1777", "private"])
def test_a_planted_entry_never_writes_outside_out(folder_mode, env, tmp_path, monkeypatch, capsys):
    model, cache_dir = env
    rc, _, err = _shard(monkeypatch, capsys, model, tmp_path / "out1")
    assert rc == 0, err
    (entry,) = _entries(cache_dir)
    created_private = stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    secret = tmp_path / "secret.safetensors"  # header-shaped, so that its header digest can be planted too
    secret.write_bytes(struct.pack("<Q", 8) + b"{}      " + b"S" * (model / "model.safetensors").stat().st_size)
    _rewrite(entry, lambda r: _plant_escape(r, secret))
    if folder_mode == "shared-1777":
        cache_dir.chmod(0o1777)
    work = tmp_path / "w" / "x"
    work.mkdir(parents=True)
    rc, _, err = _shard(monkeypatch, capsys, model, work / "out2")
    assert rc == 0, err
    assert not list(tmp_path.rglob("pwned.txt")), "a cache entry wrote outside --out"
    assert _rank_files(work / "out2") == _rank_files(tmp_path / "out1")
    if folder_mode == "shared-1777":
        assert err.count("not using the cache") == 1 and "writable by group/others" in err, err
        rc, _, err = _shard(monkeypatch, capsys, model, work / "out3")  # said once per process
        assert rc == 0 and "not using the cache" not in err
        assert _entries(cache_dir) == [entry]  # nothing written into it either
    assert created_private


def test_a_cache_folder_owned_by_someone_else_is_not_used(env, tmp_path, monkeypatch, capsys):
    model, cache_dir = env
    cache_dir.mkdir(mode=0o700)
    if os.geteuid() != 0:
        pytest.skip("needs root to give the folder away")
    os.chown(cache_dir, 65534, 65534)
    rc, _, err = _shard(monkeypatch, capsys, model, tmp_path / "out")
    assert rc == 0 and "owned by uid 65534" in err and not _entries(cache_dir), err


@pytest.mark.parametrize("drop", ["summary.source"])  # the plan's own fields: tests/test_byteplan.py
def test_an_entry_missing_a_field_is_a_miss(drop, env, tmp_path, monkeypatch, capsys):
    model, cache_dir = env
    assert _shard(monkeypatch, capsys, model, tmp_path / "out1")[0] == 0
    (entry,) = _entries(cache_dir)

    def edit(result):
        if "." in drop:
            outer, inner = drop.split(".")
            del result[outer][inner]
        else:
            del result[drop]

    _rewrite(entry, edit)
    rc, _, err = _shard(monkeypatch, capsys, model, tmp_path / "out2")
    assert rc == 0 and "Traceback" not in err, err
    assert _rank_files(tmp_path / "out2") == _rank_files(tmp_path / "out1")


def test_an_inspect_entry_missing_a_field_is_a_miss(env, monkeypatch, capsys):
    model, cache_dir = env
    rc, first, _ = run_main(monkeypatch, capsys, "inspect", model, "--tp", "2", "--json")
    assert rc == 0
    (entry,) = _entries(cache_dir)
    _rewrite(entry, lambda r: r.pop("tp"))
    rc, again, err = run_main(monkeypatch, capsys, "inspect", model, "--tp", "2", "--json")
    assert rc == 0 and again == first, err


def _flip_data_bytes(path: Path) -> None:
    """Change the last 64 data bytes of a safetensors file, same size, then put A's times back (`touch -r`)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(-64, os.SEEK_END)
        tail = f.read(64)
        f.seek(-64, os.SEEK_END)
        f.write(bytes(b ^ 0x55 for b in tail))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_flipped_symlink_shards_the_bytes_it_points_to(env, tmp_path, monkeypatch, capsys):
    a, _ = env
    b = tmp_path / "B"
    subprocess.run(["cp", "-a", str(a), str(b)], check=True)
    _flip_data_bytes(b / "model.safetensors")
    subprocess.run(["touch", "-r", str(a / "model.safetensors"), str(b / "model.safetensors")], check=True)
    assert (a / "model.safetensors").stat().st_mtime_ns == (b / "model.safetensors").stat().st_mtime_ns
    cur = tmp_path / "cur"
    cur.symlink_to(a)
    assert _shard(monkeypatch, capsys, cur, tmp_path / "out1")[0] == 0
    cur.unlink()
    cur.symlink_to(b)  # ln -sfn B cur
    assert _shard(monkeypatch, capsys, cur, tmp_path / "out2")[0] == 0
    monkeypatch.setenv(cache.ENV, "off")
    assert _shard(monkeypatch, capsys, b, tmp_path / "truth")[0] == 0
    assert _rank_files(tmp_path / "out2") == _rank_files(tmp_path / "truth") != _rank_files(tmp_path / "out1")
    assert json.loads((tmp_path / "out2" / "tpcli.json").read_text())["source"]["path"] == str(b)


def test_a_header_rewritten_at_the_same_size_with_its_mtime_back_is_seen(env, monkeypatch, capsys):
    model, _ = env
    assert run_main(monkeypatch, capsys, "inspect", model, "--tp", "2")[0] == 0  # cached
    weights = model / "model.safetensors"
    st = weights.stat()
    raw = bytearray(weights.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    at = raw.index(b'"F32"', 8, 8 + n)
    raw[at:at + 5] = b'"F64"'  # same header size; the tensor's data_offsets now cover half its bytes: corrupt
    header = json.loads(raw[8:8 + n])
    bad = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F64")
    with open(weights, "r+b") as f:  # in place: same inode, only ctime tells
        f.write(raw)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    rc, out, err = run_main(monkeypatch, capsys, "inspect", model, "--tp", "2")
    assert rc != 0 and bad in out + err, (rc, out, err)


def test_entries_are_bounded_least_recently_used_first(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "c"))
    monkeypatch.setattr(cache, "MAX_ENTRIES", 3)
    for i in range(5):
        cache.put(f"k{i}", {"i": i})
        os.utime(tmp_path / "c" / f"k{i}.json", ns=(i * 10**9, i * 10**9))
    assert cache.get("k2") == {"i": 2}  # a hit refreshes it
    cache.put("k5", {"i": 5})
    assert sorted(p.stem for p in _entries(tmp_path / "c")) == ["k2", "k4", "k5"]


def test_a_deleted_working_directory_is_one_line(env, tmp_path, monkeypatch, capsys):
    model, _ = env
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    rc, out, err = run_main(monkeypatch, capsys, "inspect", model, "--tp", "2", "--json")
    assert "Traceback" not in err
    assert rc == 2 and err.startswith("Error: ") and len(err.strip().splitlines()) == 1, err



def test_a_planted_gather_entry_never_writes_outside_out(env, tmp_path, monkeypatch, capsys):
    model, cache_dir = env
    monkeypatch.setenv(cache.ENV, "off")
    assert _shard(monkeypatch, capsys, model, tmp_path / "s")[0] == 0
    doc = json.loads((tmp_path / "s" / "tpcli.json").read_text())
    del doc["names"]  # a manifest from before the `names` record: gather plans it through transformers and the cache
    (tmp_path / "s" / "tpcli.json").write_text(json.dumps(doc))
    monkeypatch.setenv(cache.ENV, str(cache_dir))
    assert run_main(monkeypatch, capsys, "gather", tmp_path / "s", "--out", tmp_path / "g1")[0] == 0
    (entry,) = _entries(cache_dir)

    def plant(result):
        (file,) = result["plan"]["files"]
        file["name"] = "../../pwned.safetensors"

    _rewrite(entry, plant)
    work = tmp_path / "w" / "x"
    work.mkdir(parents=True)
    rc, _, err = run_main(monkeypatch, capsys, "gather", tmp_path / "s", "--out", work / "g2")
    assert rc == 0, err
    assert not list(tmp_path.rglob("pwned.safetensors")), "a cache entry wrote outside --out"
    assert (work / "g2" / "model.safetensors").read_bytes() == (tmp_path / "g1" / "model.safetensors").read_bytes()


def test_a_put_on_a_full_disk_leaves_no_temporary_file_and_stale_ones_are_swept(tmp_path, monkeypatch):
    import errno

    monkeypatch.setenv(cache.ENV, str(tmp_path / "c"))
    cache.put("k0", {"i": 0})
    stale = tmp_path / "c" / ".tmp-killed"  # what a put killed mid-write left long ago
    stale.write_text("{")
    os.utime(stale, (0, 0))
    fresh = tmp_path / "c" / ".tmp-writing"  # another process writing now: left alone
    fresh.write_text("{")

    def full(f, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "write_entry", full)
    assert cache.put("k1", {"i": 1}) == {"i": 1}  # the result still comes back; only the cache is skipped
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [".tmp-writing", "k0.json"]


def test_an_entry_over_the_byte_bound_is_not_stored_and_evicts_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "c"))
    monkeypatch.setattr(cache, "MAX_BYTES", 1000)
    for i in range(3):
        cache.put(f"k{i}", {"i": i})
    assert cache.put("big", {"x": "y" * 2000}) == {"x": "y" * 2000}
    assert sorted(p.stem for p in _entries(tmp_path / "c")) == ["k0", "k1", "k2"]
    # evict itself: an entry over the bound (written by an older tpcli) goes alone, the others stay
    (tmp_path / "c" / "huge.json").write_text("z" * 2000)
    assert cache.evict(tmp_path / "c") == ["huge.json"]
    assert sorted(p.stem for p in _entries(tmp_path / "c")) == ["k0", "k1", "k2"]
    for i in range(3, 30):  # the byte bound still holds: oldest first
        cache.put(f"k{i}", {"i": i})
        os.utime(tmp_path / "c" / f"k{i}.json", ns=(i * 10**9, i * 10**9))
    kept = _entries(tmp_path / "c")
    assert sum(p.stat().st_size for p in kept) <= 1000 and "k29" in {p.stem for p in kept}

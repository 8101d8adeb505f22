"""The inspect/verify result cache: a hit prints what the first run printed, imports neither torch nor transformers,
and every input the result depends on (config, weights, plan file, plan library, library versions, options) misses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tpcli.cli import app
from tpcli.commands import inspect as inspection
from tpcli.commands import verify as verification
from tpcli.formats import cache

runner = CliRunner()


@pytest.fixture
def model(model_dirs, tmp_path, monkeypatch):
    """A private copy of the tiny llama (the tests edit it), with the cache on in a temp dir and computations counted."""
    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    calls = []
    real_inspect, real_verify = inspection.inspect_model, verification.verify
    monkeypatch.setattr(inspection, "inspect_model", lambda *a, **k: calls.append("inspect") or real_inspect(*a, **k))
    monkeypatch.setattr(verification, "verify", lambda *a, **k: calls.append("verify") or real_verify(*a, **k))
    folder = tmp_path / "llama"
    shutil.copytree(model_dirs("llama3"), folder)
    return folder, calls


def _inspect(*args):
    result = runner.invoke(app, ["inspect", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_hit_prints_the_same_and_every_input_misses(model, tmp_path, monkeypatch):
    folder, calls = model
    first = _inspect(folder, "--tp", "2")
    assert _inspect(folder, "--tp", "2") == first and calls == ["inspect"]  # the second run is a hit
    table = runner.invoke(app, ["inspect", str(folder), "--tp", "2"]).stdout
    assert runner.invoke(app, ["inspect", str(folder), "--tp", "2"]).stdout == table and len(calls) == 2

    _inspect(folder, "--tp", "3")  # another option value
    assert len(calls) == 3
    memory = ["inspect", str(folder), "--tp", "2", "--seq-len", "128", "--gpu-mem", "24GiB"]  # the memory tables
    assert runner.invoke(app, memory).stdout == runner.invoke(app, memory).stdout and len(calls) == 4
    calls.pop()

    cfg = json.loads((folder / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6  # config.json bytes
    (folder / "config.json").write_text(json.dumps(cfg))
    _inspect(folder, "--tp", "2")
    assert len(calls) == 4

    weights = next(folder.glob("*.safetensors"))  # a weight file replaced (same size, new mtime)
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    _inspect(folder, "--tp", "2")
    assert len(calls) == 5

    plan = tmp_path / "plan.json"  # a plan file's bytes
    plan.write_text(json.dumps({"model.layers.*.mlp.down_proj": "rowwise"}))
    _inspect(folder, "--tp", "2", "--plan", plan)
    _inspect(folder, "--tp", "2", "--plan", plan)
    assert len(calls) == 6
    plan.write_text(json.dumps({f"model.layers.*.mlp.{p}": "replicate" for p in ("gate_proj", "up_proj", "down_proj")}))
    assert json.loads(_inspect(folder, "--tp", "2", "--plan", plan)) != json.loads(first)
    assert len(calls) == 7

    library = tmp_path / "plans"  # the plan library
    library.mkdir()
    monkeypatch.setattr(cache, "_PLAN_LIBRARIES", (library,))
    _inspect(folder, "--tp", "2")
    (library / "llama.json").write_text("{}")
    _inspect(folder, "--tp", "2")
    assert len(calls) == 9

    real_version = cache.installed_version  # a library version string
    monkeypatch.setattr(cache, "installed_version", lambda d: "0.0.0-other" if d == "transformers" else real_version(d))
    _inspect(folder, "--tp", "2")
    assert len(calls) == 10
    monkeypatch.setattr(cache, "installed_version", real_version)
    _inspect(folder, "--tp", "2")
    assert len(calls) == 10  # back to the versions of the earlier entry: a hit


def test_verify_caches_passing_static_results_only(model, tmp_path):
    folder, calls = model
    for _ in range(2):
        result = runner.invoke(app, ["verify", str(folder), "--tp", "2", "--json"])
        assert result.exit_code == 0 and json.loads(result.stdout)["ok"]
    assert calls == ["verify"]
    for _ in range(2):  # 6 heads do not split 4 ways: a failed result, never stored
        assert runner.invoke(app, ["verify", str(folder), "--tp", "4", "--json"]).exit_code == 1
    assert calls == ["verify"] * 3


def test_not_cached(model, tmp_path, monkeypatch):
    folder, _ = model
    assert cache.key("inspect", {"model": "org/name", "tp": 2}) is None  # hub id
    assert cache.key("inspect", {"model": str(folder), "revision": "main"}) is None
    assert cache.key("verify", {"target": str(folder), "tp": 2, "numerics": True}) is None
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "shard-00001-model-00001-of-00002.safetensors").write_bytes(b"")
    assert cache.key("verify", {"target": str(sharded)}) is None
    assert cache.key("inspect", {"model": str(folder), "tp": 2}) is not None
    monkeypatch.setenv(cache.ENV, "off")
    assert cache.key("inspect", {"model": str(folder), "tp": 2}) is None
    monkeypatch.delenv(cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "tpcli"


def test_a_hit_imports_neither_torch_nor_transformers(model, tmp_path):
    folder, calls = model
    first = _inspect(folder, "--tp", "2")
    code = ("import sys\nfrom tpcli.cli import main\n"
            f"sys.argv = ['tpcli', 'inspect', {str(folder)!r}, '--tp', '2', '--json']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('LOADED', 'torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, cache.ENV: str(tmp_path / "cache")})
    assert proc.stdout.rstrip().endswith("LOADED False False"), proc.stderr
    assert proc.stdout.rsplit("LOADED", 1)[0] == first


# --- shard / gather: the layout of the byte-moving path (tpcli.formats.bytecopy) is cached, the bytes are always moved ---

HIT_SCRIPT = """
import json, sys
from tpcli.commands.shard import shard_checkpoint
from tpcli.commands.gather import gather_checkpoint
cmd, src, out = sys.argv[1:4]
fn = shard_checkpoint if cmd == "shard" else gather_checkpoint
fn(src, out=out, **({"tp": 2} if cmd == "shard" else {"max_shard_size": "60KB"}))
print(json.dumps(sorted(m for m in ("torch", "transformers") if m in sys.modules)))
"""


def _digests(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _run(cmd, src, out, cache_dir):
    env = {**os.environ, cache.ENV: str(cache_dir)}
    proc = subprocess.run([sys.executable, "-c", HIT_SCRIPT, cmd, str(src), str(out)], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.e2e
def test_shard_and_gather_hits_skip_torch_and_write_the_same_files(model_dirs, tmp_path):
    """A second shard / gather of the same input is planned from the cache (neither torch nor transformers is
    imported) and writes exactly what the first run, and the uncached general path, wrote."""
    from tpcli.commands.gather import gather_checkpoint
    from tpcli.commands.shard import shard_checkpoint

    src, c = model_dirs("llama"), tmp_path / "cache"
    assert _run("shard", src, tmp_path / "s1", c) == ["torch", "transformers"]  # planned, then cached
    assert _run("shard", src, tmp_path / "s2", c) == []
    shard_checkpoint(str(src), tp=2, out=str(tmp_path / "s-ref"), byte_copy=False)
    assert _digests(tmp_path / "s1") == _digests(tmp_path / "s2") == _digests(tmp_path / "s-ref")
    # gather plans a folder whose manifest vouches for it from the manifest alone (tests/test_manifest_gather.py);
    # the layout cache serves the others: here a manifest from before the `names` record
    doc = json.loads((tmp_path / "s1" / "tpcli.json").read_text())
    del doc["names"]
    (tmp_path / "s1" / "tpcli.json").write_text(json.dumps(doc, indent=1) + "\n")
    assert _run("gather", tmp_path / "s1", tmp_path / "g1", c) == ["torch", "transformers"]
    assert _run("gather", tmp_path / "s1", tmp_path / "g2", c) == []
    gather_checkpoint(str(tmp_path / "s1"), out=str(tmp_path / "g-ref"), max_shard_size="60KB", byte_copy=False)
    assert _digests(tmp_path / "g1") == _digests(tmp_path / "g2") == _digests(tmp_path / "g-ref")


@pytest.mark.e2e
def test_a_changed_header_with_the_same_size_and_mtime_is_replanned(model_dirs, tmp_path, monkeypatch):
    """The key covers sizes, mtimes and ctimes; a hit also compares each source file's header with the one planned.
    Here two same-shaped tensors swap places inside a weight file (same size, same header length, mtime restored),
    and the old entry is filed under the new key (as if the key had still matched): the header does not, so the
    shard is replanned and moves the right bytes."""
    import struct

    from tpcli.commands.shard import shard_checkpoint
    from tpcli.formats.rankfile import read_header

    src = tmp_path / "llama"
    shutil.copytree(model_dirs("llama3"), src)
    c = tmp_path / "cache"
    monkeypatch.setenv(cache.ENV, str(c))
    params = {"model": str(src), "tp": 2, "plan": None, "dtype": None, "revision": None}
    before = cache.key("shard", params)
    _run("shard", src, tmp_path / "before", c)
    weights = next(src.glob("*.safetensors"))
    st = weights.stat()
    header, _ = read_header(weights)
    a, b = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    assert header[a]["shape"] == header[b]["shape"] and header[a]["data_offsets"] != header[b]["data_offsets"]
    raw = bytearray(weights.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    text = json.loads(raw[8:8 + n])
    text[a]["data_offsets"], text[b]["data_offsets"] = text[b]["data_offsets"], text[a]["data_offsets"]
    new = json.dumps(text, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n
    raw[8:8 + n] = new  # the tensors' bytes stay where they were: a reads b's old place, which holds b's values
    weights.write_bytes(raw)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = cache.key("shard", params)
    assert after != before  # the key names the bytes (ctime_ns, inode), so this is already a miss
    entry = json.loads((c / f"{before}.json").read_text())  # file the old entry under the new key: a key that
    (c / f"{after}.json").write_text(json.dumps({**entry, "key": after}))  # still matched, only the header check tells
    _run("shard", src, tmp_path / "after", c)
    shard_checkpoint(str(src), tp=2, out=str(tmp_path / "ref"), byte_copy=False)
    assert _digests(tmp_path / "after") == _digests(tmp_path / "ref") != _digests(tmp_path / "before")


def test_the_key_never_reads_a_linked_json_nor_a_whole_file_at_once(tmp_path, monkeypatch):
    """A handed folder with `x.json` linked to a 64 MiB file elsewhere: the key read the target whole into memory
    (and the bytes of a file outside the folder); now a link is named by its identity and files are hashed in
    chunks (peak memory well under the file)."""
    import tracemalloc

    monkeypatch.setenv(cache.ENV, str(tmp_path / "c"))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    big = tmp_path / "elsewhere.bin"
    with open(big, "wb") as f:
        f.truncate(64 << 20)
    (folder / "x.json").symlink_to(big)
    tracemalloc.start()
    try:
        k = cache.key("inspect", {"model": str(folder)})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert k is not None and peak < 32 << 20, peak

"""Bad input, table-driven: every case is one CLI call (in-process, through `cli.main`) that must fail with exactly
one `Error:` line naming the file or flag, the right exit code, no traceback, and nothing left in the output's
parent (no output folder, no temporary folder; a pre-existing folder is left exactly as it was).

Cases cover lying safetensors headers (the nine kinds the safetensors library rejects), corrupt and edited sharded
folders (resharding must not launder them), file names that leave the model folder, special files, `--out` that
would overwrite its input, `--force` over a folder tpcli did not write, a full disk and a failing final rename.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_main

from tpcli.commands.shard import shard_checkpoint

SHARD1 = "shard-00001-model-00001-of-00001.safetensors"
SHARD2 = "shard-00002-model-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def sharded_src(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "sharded"
    shard_checkpoint(str(model_dirs("qwen3")), tp=2, out=str(out))
    return out


# --- helpers that break a copy of a model ------------------------------------------------------------------------

def _rewrite_header(path: Path, edit) -> None:
    """Apply `edit(header dict, tensors sorted by offset)` to a safetensors file's header, keeping its data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    edit(header, order)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _same_size_pair(header, order):
    sizes = {}
    for k in order:
        b, e = header[k]["data_offsets"]
        if e - b in sizes:
            return sizes[e - b], k
        sizes[e - b] = k
    raise AssertionError("no two tensors of equal size")


def _header_case(edit):
    def setup(ctx):
        src = ctx.copy_model()
        _rewrite_header(src / "model.safetensors", edit)
        return ["shard", src, "--tp", "1", "--out", ctx.out]
    return setup


def _overlap(h, order):
    a, b = _same_size_pair(h, order)
    h[b]["data_offsets"] = list(h[a]["data_offsets"])  # b now reads a's bytes: the case main sharded silently


def _past_end(h, order):
    b, e = h[order[-1]]["data_offsets"]
    h[order[-1]]["data_offsets"] = [b + 8, e + 8]  # shifted past the end of the data (leaves a gap too)


def _header_len(ctx):
    src = ctx.copy_model()
    f = src / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 2**62) + f.read_bytes()[8:])
    return ["shard", src, "--tp", "1", "--out", ctx.out]


def _fifo(command):
    def setup(ctx):
        src = ctx.copy_model()
        (src / "model.safetensors").unlink()
        os.mkfifo(src / "model.safetensors")
        return [command, src, *(["--tp", "1", "--out", ctx.out] if command == "shard" else [])]
    return setup


def _sharded(edit, command="shard"):
    def setup(ctx):
        s = ctx.copy_sharded()
        edit(s)
        if command == "verify":
            return ["verify", s, "--json"]
        if command == "gather":
            return ["gather", s, "--out", ctx.out]
        return ["shard", s, "--tp", "1", "--out", ctx.out]
    return setup


def _flip(s):
    f = s / SHARD2
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))


def _swap(s):
    (s / SHARD1).rename(s / "tmp")
    (s / SHARD2).rename(s / SHARD1)
    (s / "tmp").rename(s / SHARD2)


def _fifo_file(name):
    def edit(s):
        (s / name).unlink()
        os.mkfifo(s / name)
    return edit


def _manifest(edit):
    def apply(s):
        doc = json.loads((s / "tpcli.json").read_text())
        edit(doc)
        (s / "tpcli.json").write_text(json.dumps(doc))
    return apply


def _first_tensor(doc):
    return doc["tensors"][sorted(doc["tensors"])[0]]


def _outside_file(doc):
    entry = doc["files"].pop(SHARD2)
    doc["files"]["../outside.safetensors"] = entry


def _absolute_chunk(doc):
    _first_tensor(doc)["chunks"][0]["file"] = "/etc/hostname"


def _index(weight_file):
    def setup(ctx):
        src = ctx.copy_model()
        (ctx.root / "secret").mkdir()
        shutil.copy(src / "model.safetensors", ctx.root / "secret" / "x.safetensors")
        (src / "model.safetensors").unlink()
        with_path = str(ctx.root / "secret" / "x.safetensors") if weight_file == "ABS" else weight_file
        names = json.loads(json.dumps(_keys(ctx.model)))
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: with_path for k in names}}))
        return ["shard", src, "--tp", "1", "--out", ctx.out]
    return setup


def _keys(model: Path) -> list[str]:
    from tpcli.formats.rankfile import read_header

    return list(read_header(model / "model.safetensors")[0])


def _link_out(name):
    def setup(ctx):
        src = ctx.copy_model()
        target = ctx.root / f"elsewhere-{name}"
        shutil.copy(src / name, target)
        (src / name).unlink()
        (src / name).symlink_to(target)
        return ["shard", src, "--tp", "1", "--out", ctx.out]
    return setup


def _linked_out(name):
    """`name` in the sharded folder replaced by a link to an identical copy outside it."""
    def apply(s):
        target = s.parent / f"elsewhere-{name}"
        shutil.copy(s / name, target)
        (s / name).unlink()
        (s / name).symlink_to(target)
    return apply


def _inspect_link_out(name):
    def setup(ctx):
        _link_out(name)(ctx)
        return ["inspect", ctx.root / "model", "--tp", "1"]
    return setup


def _out_is_input(ctx):
    src = ctx.copy_model()
    return ["shard", src, "--tp", "1", "--out", src, "--force"]


def _out_inside_input(ctx):
    src = ctx.copy_model()
    return ["shard", src, "--tp", "1", "--out", src / "sub" / ".." / "shards"]


def _out_contains_input(ctx):
    src = ctx.copy_model()
    return ["shard", src, "--tp", "1", "--out", ctx.root, "--force"]


def _out_via_symlink(ctx):
    src = ctx.copy_model()
    (ctx.root / "alias").symlink_to(src)
    return ["shard", src, "--tp", "1", "--out", ctx.root / "alias", "--force"]


def _gather_out_contains(ctx):
    s = ctx.copy_sharded()
    return ["gather", s, "--out", ctx.root, "--force"]


def _gather_out_is_input(ctx):
    s = ctx.copy_sharded()
    return ["gather", s, "--out", s, "--force"]


def _force_over_foreign(ctx):
    src = ctx.copy_model()
    ctx.out.mkdir()
    (ctx.out / "thesis.tex").write_text("years of work")
    return ["shard", src, "--tp", "1", "--out", ctx.out, "--force"]


def _disk_too_small(ctx):
    import shutil as sh

    src = ctx.copy_model()
    real = sh.disk_usage
    ctx.monkeypatch.setattr("tpcli.formats.output.shutil.disk_usage",
                            lambda p: real(p)._replace(free=300_000))  # the output needs ~530 KB
    return ["shard", src, "--tp", "2", "--out", ctx.out]


def _enospc(ctx):
    src = ctx.copy_model()
    from tpcli.formats import tensor_file

    real = tensor_file.open_for_writing

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 100_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def close(self):
            self.f.close()

    ctx.monkeypatch.setattr(tensor_file, "open_for_writing", lambda p: Full(real(p)))
    # the byte-moving path (tpcli.formats.bytecopy) writes with pwrite / copy_file_range on the file's descriptor
    written = [0]
    real_write_at, real_copy_range = tensor_file.write_at, tensor_file.copy_range

    def fill(n):
        written[0] += n
        if written[0] > 100_000:
            raise OSError(errno.ENOSPC, "No space left on device")

    def write_at(f, data, pos):
        fill(len(memoryview(data).cast("B")))
        real_write_at(f.f, data, pos)

    def copy_range(src_fd, f, n, src_pos, pos):
        fill(n)
        real_copy_range(src_fd, f.f, n, src_pos, pos)

    ctx.monkeypatch.setattr(tensor_file, "write_at", write_at)
    ctx.monkeypatch.setattr(tensor_file, "copy_range", copy_range)
    return ["shard", src, "--tp", "2", "--out", ctx.out]


def _rename_fails(ctx):
    src = ctx.copy_model()
    real = os.replace

    def replace(a, b):
        if ".tpcli-tmp-" in Path(a).name:  # the temporary folder itself, not a file inside it
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(a, b)

    ctx.monkeypatch.setattr("tpcli.formats.output.os.replace", replace)
    return ["shard", src, "--tp", "1", "--out", ctx.out]


def _mount_point(ctx):
    src = ctx.copy_model()
    ctx.out.mkdir()
    real = os.path.ismount
    ctx.monkeypatch.setattr("tpcli.formats.output.os.path.ismount", lambda p: Path(p) == ctx.out or real(p))
    return ["shard", src, "--tp", "1", "--out", ctx.out]


def _hub_offline(ctx):
    ctx.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ctx.monkeypatch.setenv("HF_HOME", str(ctx.root / "hf"))
    return ["shard", "tpcli-no-such-org/no-such-model", "--tp", "1", "--out", ctx.out]


def _unknown_dtype(ctx):
    return ["shard", ctx.copy_model(), "--tp", "1", "--out", ctx.out, "--dtype", "fp12"]


def _dcp_metadata(value):
    """A transformers-style folder (no tpcli.json) whose rank-1 DCP_SHARDING_INFO is `value` (JSON text)."""
    def apply(s):
        (s / "tpcli.json").unlink()

        def edit(h, order):
            h["__metadata__"]["DCP_SHARDING_INFO"] = value(h) if callable(value) else value
        _rewrite_header(s / SHARD1, edit)
    return apply


def _offsets_text(h):
    info = json.loads(h["__metadata__"]["DCP_SHARDING_INFO"])
    info[sorted(info)[0]]["saved_offsets"] = "0,0"
    return json.dumps(info)


CASES = {
    # lying safetensors headers (issue 12.1): the file and the tensor are named; every bound is tests/test_rankfile.py,
    # these three prove the CLI renders the reader's refusal in one line
    "header-past-end": (_header_case(_past_end), 1, ["model.safetensors"]),
    "header-overlap": (_header_case(_overlap), 1, ["model.safetensors", "overlap"]),
    "header-absurd-length": (_header_len, 1, ["model.safetensors", "header length"]),
    # special files (issue 16.10)
    "fifo-weights-shard": (_fifo("shard"), 1, ["model.safetensors", "FIFO"]),
    "fifo-weights-inspect": (_fifo("inspect"), 1, ["model.safetensors", "FIFO"]),
    # corrupt sharded folders must not be resharded (issue 16.2) nor gathered
    "reshard-flipped-byte": (_sharded(_flip), 1, [SHARD2, "sha256"]),
    "reshard-swapped-ranks": (_sharded(_swap), 1, [SHARD1]),
    "reshard-edited-shape": (_sharded(_manifest(lambda d: _first_tensor(d).update(shape=[7]))), 1, ["edited"]),
    "reshard-tp-size-string": (_sharded(_manifest(lambda d: d.update(tp_size="2"))), 1, ["tpcli.json", "tp_size"]),
    "reshard-tensor-not-object": (_sharded(_manifest(lambda d: d["tensors"].update(
        {sorted(d["tensors"])[0]: "x"}))), 1, ["tpcli.json", "tensors["]),
    "reshard-chunks-missing": (_sharded(_manifest(lambda d: _first_tensor(d).pop("chunks"))), 1,
                               ["tpcli.json", "chunks"]),
    "reshard-manifest-file-outside": (_sharded(_manifest(_outside_file)), 1, ["tpcli.json", "outside.safetensors"]),
    "gather-manifest-absolute-chunk": (_sharded(_manifest(_absolute_chunk), "gather"), 1, ["tpcli.json", "file"]),
    "gather-swapped-ranks": (_sharded(_swap, "gather"), 1, [SHARD1]),
    "gather-dcp-info-not-object": (_sharded(_dcp_metadata("[1, 2]"), "gather"), 1, [SHARD1, "DCP_SHARDING_INFO"]),
    "gather-dcp-offsets-not-list": (_sharded(_dcp_metadata(_offsets_text), "gather"), 1, [SHARD1, "saved_offsets"]),
    "verify-manifest-file-outside": (_sharded(_manifest(_outside_file), "verify"), 1, ["outside.safetensors"]),
    "verify-tp-size-string": (_sharded(_manifest(lambda d: d.update(tp_size="2")), "verify"), 1, ["tp_size"]),
    # red team: a tp_size of 10^12 built list(range(tp_size)) before comparing (MemoryError traceback)
    "verify-tp-size-huge": (_sharded(_manifest(lambda d: d.update(tp_size=10**12)), "verify"), 1,
                            ["tpcli.json", "tp_size 1000000000000"]),
    "gather-tp-size-huge": (_sharded(_manifest(lambda d: d.update(tp_size=10**12)), "gather"), 1,
                            ["tpcli.json", "tp_size 1000000000000"]),
    # reads outside the model folder (issue 16.3)
    "index-names-parent": (_index("../secret/x.safetensors"), 1, ["model.safetensors.index.json", "../secret"]),
    "index-names-absolute": (_index("ABS"), 1, ["model.safetensors.index.json", "secret"]),
    "index-names-missing": (_index("gone.safetensors"), 1, ["gone.safetensors", "missing"]),
    "weights-link-out": (_link_out("model.safetensors"), 1, ["model.safetensors", "outside"]),
    "tokenizer-link-out": (_link_out("tokenizer.json"), 1, ["tokenizer.json", "outside"]),
    "verify-manifest-link-out": (_sharded(_linked_out("tpcli.json"), "verify"), 1, ["tpcli.json", "outside"]),
    "gather-config-link-out": (_sharded(_linked_out("config.json"), "gather"), 1, ["config.json", "outside"]),
    "verify-config-link-out": (_sharded(_linked_out("config.json"), "verify"), 1, ["config.json", "outside"]),
    # red team: config.json a FIFO in a sharded folder: verify and gather hashed it first (config_sha256) and waited
    "verify-config-fifo": (_sharded(_fifo_file("config.json"), "verify"), 1, ["config.json", "FIFO"]),
    "gather-config-fifo": (_sharded(_fifo_file("config.json"), "gather"), 1, ["config.json", "FIFO"]),
    "inspect-config-link-out": (_inspect_link_out("config.json"), 1, ["config.json", "outside"]),
    # --out and --force (issue 16.1)
    "out-is-input": (_out_is_input, 1, ["--out", "is the input"]),
    "out-inside-input": (_out_inside_input, 1, ["--out", "inside the input"]),
    "out-contains-input": (_out_contains_input, 1, ["--out", "contains the input"]),
    "out-symlink-to-input": (_out_via_symlink, 1, ["--out", "is the input"]),
    "gather-out-contains-input": (_gather_out_contains, 1, ["--out", "contains the input"]),
    "gather-out-is-input": (_gather_out_is_input, 1, ["--out", "is the input"]),
    "force-over-foreign-folder": (_force_over_foreign, 1, ["--out", "not a tpcli output"]),
    "out-mount-point": (_mount_point, 1, ["--out", "mount point"]),
    # disk full, failed rename (issue 12.2, 16.10)
    "disk-too-small": (_disk_too_small, 1, ["--out", "needs ", "300.0 KB free on /"]),
    "disk-fills-while-writing": (_enospc, 1, ["--out", "no space left", "shard-0000"]),
    "final-rename-fails": (_rename_fails, 1, ["--out", "could not move"]),
    # flags and sources
    "unknown-dtype": (_unknown_dtype, 2, ["--dtype"]),
    "hub-id-offline": (_hub_offline, 1, ["tpcli-no-such-org/no-such-model"]),
}


class Ctx:
    def __init__(self, root: Path, model: Path, sharded: Path, monkeypatch):
        self.root, self.model, self.sharded, self.monkeypatch = root, model, sharded, monkeypatch
        self.out = root / "out"

    def copy_model(self) -> Path:
        return Path(shutil.copytree(self.model, self.root / "model"))

    def copy_sharded(self) -> Path:
        return Path(shutil.copytree(self.sharded, self.root / "sharded"))


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_fifo() else None)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, model_dirs, sharded_src, tmp_path, monkeypatch, capsys):
    setup, code, needles = CASES[case]
    root = tmp_path / "work"
    root.mkdir()
    ctx = Ctx(root, model_dirs("qwen3"), sharded_src, monkeypatch)
    args = setup(ctx)
    before = _snapshot(root)
    rc, out, err = run_main(monkeypatch, capsys, *args)
    assert rc == code, (rc, out, err)
    assert "Traceback" not in out + err
    if args[0] == "verify":  # verify reports findings (exit 1) instead of raising: one error finding naming the file
        doc = json.loads(out)
        errors = [f for f in doc["findings"] if f["severity"] == "error"]
        assert not doc["ok"] and len(errors) == 1, doc
        line = errors[0]["message"]
    else:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: "), err
        line = lines[0]
    for needle in needles:
        assert needle in line, (needle, line)
    assert _snapshot(root) == before, "the inputs and the output's parent must be left exactly as they were"


def test_interrupted_run_leaves_a_temp_folder_the_next_run_removes(model_dirs, tmp_path, monkeypatch, capsys):
    """A process killed mid-write (os._exit: no cleanup runs) leaves its temp folder; the next run into the same
    parent removes it and says so, but leaves alone temp folders of live processes, other hosts, or unmarked ones."""
    out = tmp_path / "out"
    code = ("import os, sys\nfrom pathlib import Path\nfrom tpcli.formats.output import atomic_dir\n"
            "with atomic_dir(Path(sys.argv[1])) as tmp:\n    (tmp / 'half.safetensors').write_bytes(b'x')\n"
            "    os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(out)], check=True)
    (stale,) = tmp_path.glob(".out.tpcli-tmp-*")
    assert json.loads((stale / ".tpcli-tmp.json").read_text())["tool"] == "tpcli"
    keep = {}
    for label, info in {"alive": {"pid": os.getpid()}, "other-host": {"pid": 2**22 + 1, "host": "elsewhere"},
                        "unmarked": None}.items():
        d = tmp_path / f".out.tpcli-tmp-{label}"
        d.mkdir()
        if info is not None:
            import socket

            (d / ".tpcli-tmp.json").write_text(json.dumps({"tool": "tpcli", "host": socket.gethostname(), **info}))
        keep[label] = d
    monkeypatch.setenv("COLUMNS", "300")
    rc, stdout, _ = run_main(monkeypatch, capsys, "shard", model_dirs("qwen3"), "--tp", "1", "--out", out)
    assert rc == 0
    assert not stale.exists() and f"removed a stale temporary folder of an interrupted tpcli run: {stale}" in stdout
    assert all(d.is_dir() for d in keep.values())
    assert (out / ".tpcli-output").is_file() and not (out / ".tpcli-tmp.json").exists()
    # the published marker says what made the folder, nothing about this host or process (outputs get uploaded)
    assert json.loads((out / ".tpcli-output").read_text()) == {"tool": "tpcli", "command": "shard"}


def test_a_run_killed_while_deleting_the_replaced_output_leaves_nothing_the_next_run_keeps(tmp_path, monkeypatch,
                                                                                           capsys, model_dirs):
    """--force moves the previous output into a marked temporary folder before deleting it: a process killed during
    that deletion (os._exit in rmtree: no cleanup runs) leaves a folder the next run removes, not a hidden copy of
    the old output forever (it used to be `.out.tpcli-old-PID`, which nothing removed)."""
    out = tmp_path / "out"
    code = ("import os, sys\nfrom pathlib import Path\nfrom tpcli.formats import output\n"
            "output.shutil.rmtree = lambda *a, **k: os._exit(0)\n"
            "with output.atomic_dir(Path(sys.argv[1]), command='shard', force=True) as tmp:\n"
            "    (tmp / 'new.safetensors').write_bytes(b'new')\n")
    out.mkdir()
    (out / ".tpcli-output").write_text("{}")
    (out / "old.safetensors").write_bytes(b"old")
    subprocess.run([sys.executable, "-c", code, str(out)], check=True)
    assert sorted(p.name for p in out.iterdir()) == [".tpcli-output", "new.safetensors"]
    (holder,) = tmp_path.glob(".out.tpcli-tmp-*")
    assert (holder / "old" / "old.safetensors").read_bytes() == b"old"
    monkeypatch.setenv("COLUMNS", "300")
    rc, stdout, _ = run_main(monkeypatch, capsys, "shard", model_dirs("qwen3"), "--tp", "1", "--out", out, "--force")
    assert rc == 0 and f"removed a stale temporary folder of an interrupted tpcli run: {holder}" in stdout
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_final_rename_under_force_puts_the_previous_output_back(sharded_src, tmp_path, monkeypatch, capsys):
    out = tmp_path / "g"
    assert run_main(monkeypatch, capsys, "gather", sharded_src, "--out", out)[0] == 0
    before = _snapshot(out)
    real = os.replace

    def replace(a, b):
        if ".tpcli-tmp-" in Path(a).name:  # the finished temporary folder onto --out
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(a, b)

    monkeypatch.setattr("tpcli.formats.output.os.replace", replace)
    rc, _, err = run_main(monkeypatch, capsys, "gather", sharded_src, "--out", out, "--force")
    assert rc == 1 and "could not move the finished output into place" in err and "previous output" not in err
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["g"]


def test_force_replaces_a_previous_gather_output(sharded_src, tmp_path, monkeypatch, capsys):
    out = tmp_path / "g"
    assert run_main(monkeypatch, capsys, "gather", sharded_src, "--out", out)[0] == 0
    (out / "extra.txt").write_text("x")
    assert run_main(monkeypatch, capsys, "gather", sharded_src, "--out", out, "--force")[0] == 0
    assert not (out / "extra.txt").exists() and (out / "model.safetensors").is_file()


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                                capture_output=True).returncode == 0


@pytest.mark.parametrize("check", [True, False])
def test_a_real_full_filesystem(check, model_dirs, tmp_path, monkeypatch, capsys):
    """On a 256 KB tmpfs (needs root; the injected cases above cover the same paths without it): the up-front check
    refuses, and with the check disabled the real ENOSPC becomes one line and leaves nothing behind."""
    mnt = tmp_path / "mnt"
    if not _tmpfs(mnt, "256k"):
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        if not check:
            monkeypatch.setattr("tpcli.formats.executor.check_free_space", lambda *a: None)
        rc, _, err = run_main(monkeypatch, capsys, "shard", model_dirs("qwen3"), "--tp", "2", "--out", mnt / "o")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in err
        assert (" KB, 2" in err and f"free on {mnt}" in err) if check else "no space left on the device while writing shard-" in err
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("command", ["shard", "gather"])
def test_free_space_estimate_covers_the_output(command, model_dirs, sharded_src, tmp_path, monkeypatch):
    """The size the up-front check asks for is never less than what is then written (and not wildly more)."""
    from tpcli.commands.gather import gather_checkpoint
    from tpcli.formats import output

    asked = []
    real = output.check_free_space
    monkeypatch.setattr("tpcli.formats.executor.check_free_space",  # the one writer's estimate, for each planner
                        lambda out, needed: (asked.append(needed), real(out, needed)))
    out = tmp_path / "o"
    if command == "shard":
        shard_checkpoint(str(model_dirs("qwen3")), tp=2, out=str(out))
    else:
        gather_checkpoint(str(sharded_src), out=str(out))
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert written <= asked[0] <= written * 1.2 + 65536, (written, asked)


def test_a_real_mount_point_as_out(model_dirs, tmp_path, monkeypatch, capsys):
    """--out that is itself a mount point (needs root to mount; the `out-mount-point` case covers it without):
    main wrote the whole output beside it, then the rename failed with a traceback and left it there."""
    mnt = tmp_path / "mnt"
    if not _tmpfs(mnt, "4m"):
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        rc, _, err = run_main(monkeypatch, capsys, "shard", model_dirs("qwen3"), "--tp", "1", "--out", mnt)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 1 and len(lines) == 1 and "is a mount point" in lines[0] and str(mnt) in lines[0]
        assert os.listdir(mnt) == [] and sorted(os.listdir(tmp_path)) == ["mnt"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("edit,field", [
    (_absolute_chunk, "chunks[0].file"),
    (_outside_file, "files['../outside.safetensors']"),
    (lambda d: _first_tensor(d)["chunks"][0].update(file="../" + SHARD1), "chunks[0].file"),
])
def test_load_model_never_opens_a_file_outside_the_folder(edit, field, sharded_src, tmp_path):
    """load_model reads chunk files by the names in tpcli.json: manifest.read refuses any that is not a plain name
    listed under `files` (main opened absolute paths as given)."""
    from tpcli import load_model
    from tpcli.errors import CheckpointError

    s = Path(shutil.copytree(sharded_src, tmp_path / "s"))
    _manifest(edit)(s)
    with pytest.raises(CheckpointError, match=r"tpcli\.json: field .*" + field.replace("[", r"\[").replace("]", r"\]")):
        load_model(s)

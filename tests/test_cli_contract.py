"""The CLI contract, table-driven: every usage error is one `Error:` line naming the flag (exit 2), every bad
input one line (exit 1), never a traceback; output in a pipe is never cut; signals clean up like Ctrl-C.

The contract is tested with the typer that pyproject allows (>= 0.29, whose vendored click raises its own
exception classes: the reason usage errors used to be tracebacks).
"""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import base_env
from test_cli import run_main

import tpcli.formats.source
from tpcli import versions
from tpcli.commands.shard import shard_checkpoint

TPCLI = [sys.executable, "-m", "tpcli"]


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("Error:")]


# (name, argv with MODEL/DIR/OUT/SCRIPT placeholders, exit code, text the one Error line must contain)
CASES = [
    ("mistyped command", ["inspct", "MODEL"], 2, "No such command 'inspct'"),
    ("missing argument", ["inspect"], 2, "Missing argument"),
    ("missing option", ["shard", "MODEL", "--tp", "2"], 2, "'--out'"),
    ("tp not a number", ["inspect", "MODEL", "--tp", "abc"], 2, "'--tp'"),
    ("tp zero", ["verify", "MODEL", "--tp", "0"], 2, "--tp must be >= 1"),
    ("unknown flag", ["inspect", "MODEL", "--tpp", "2"], 2, "--tpp"),
    ("max-shard-size abc", ["gather", "DIR", "--out", "OUT", "--max-shard-size", "abc"], 2, "--max-shard-size 'abc'"),
    ("max-shard-size 0", ["gather", "DIR", "--out", "OUT", "--max-shard-size", "0"], 2, "--max-shard-size '0'"),
    ("max-shard-size -5", ["gather", "DIR", "--out", "OUT", "--max-shard-size", "-5"], 2, "--max-shard-size '-5'"),
    ("malformed hub id", ["inspect", "Qwen/Qwen3 0.6B"], 1, "not a valid hub id"),
    ("org/name not local, offline", ["inspect", "no-such-org/no-such-model"], 1, "no such local folder"),
    ("run timeout bad value", ["run", "--timeout", "soon", "SCRIPT"], 2, "--timeout 'soon'"),
    ("run timeout zero", ["run", "--timeout", "0s", "SCRIPT"], 2, "--timeout '0s'"),
    ("run no script", ["run", "--cpu", "2"], 2, "SCRIPT.py or -m MODULE"),
    ("run world size", ["run", "--cpu", "3", "--model", "MODEL", "SCRIPT"], 1, "world size 3 is invalid"),
    ("inspect invalid tp", ["inspect", "MODEL", "--tp", "3"], 1, None),
    ("run mistyped flag", ["run", "--gpu", "2", "SCRIPT"], 2, "No such option: --gpu (Possible options: --gpus"),
    ("run mistyped flag=value", ["run", "--cpus=2", "SCRIPT"], 2, "No such option: --cpus (Possible options: --cpu"),
    ("run example as a script", ["run", "--cpu", "1", "generate.py"], 2, "-m tpcli.examples.generate"),
    ("shard invalid tp", ["shard", "MODEL", "--tp", "3", "--out", "OUT"], 1, "; valid TP sizes: 1, 2."),
]


@pytest.mark.parametrize("name,argv,code,needle", CASES, ids=[c[0] for c in CASES])
def test_usage_and_bad_input_are_one_line(model_dirs, tmp_path, monkeypatch, capsys, name, argv, code, needle):
    monkeypatch.delenv("TPCLI_DEBUG", raising=False)
    marker = tmp_path / "spawned"
    script = tmp_path / "s.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    subs = {"MODEL": str(model_dirs("qwen3")), "DIR": str(tmp_path), "OUT": str(tmp_path / "out"),
            "SCRIPT": str(script)}
    rc, out, err = run_main(monkeypatch, capsys, *[subs.get(a, a) for a in argv])
    assert rc == code, (out, err)
    assert "Traceback" not in out + err
    assert not marker.exists() and not (tmp_path / "out").exists()
    if needle is None:  # an invalid --tp for inspect: the report (with the reasons) and exit 1, no error line
        assert "tp=3: num_attention_heads=4 not divisible by 3" in out and _error_lines(err) == []
        return
    lines = _error_lines(err)
    assert len(lines) == 1 and needle in lines[0], err
    assert err.strip().count("\n") == 0, err  # nothing besides that line


@pytest.mark.parametrize("argv,code", [([], 2), (["-h"], 0), (["--help"], 0), (["inspect", "-h"], 0)])
def test_no_arguments_and_dash_h_show_help(monkeypatch, capsys, argv, code):
    rc, out, err = run_main(monkeypatch, capsys, *argv)
    assert rc == code and "Usage: tpcli" in out and err == ""


def test_verify_help_states_the_tolerances_the_code_uses(monkeypatch, capsys):
    from tpcli.commands.verify import DEFAULT_TOLERANCE

    rc, out, _ = run_main(monkeypatch, capsys, "verify", "--help")
    text = " ".join(out.split())
    fp32, half = re.search(r"default fp32 ([0-9.e-]+), bf16/fp16 ([0-9.e-]+)\)", text).groups()
    assert rc == 0 and float(fp32) == DEFAULT_TOLERANCE["float32"] and float(half) == DEFAULT_TOLERANCE["bfloat16"]


def test_missing_org_name_folder_fails_fast_when_the_hub_is_unreachable(monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: connection refused
    monkeypatch.setattr(tpcli.formats.source, "PROBE_TIMEOUT_S", 1.0)
    rc, _, err = run_main(monkeypatch, capsys, "inspect", "no-such-org/no-such-model")
    assert rc == 1 and _error_lines(err) == [err.strip()]
    assert "no such local folder" in err and "unreachable" in err


def test_large_tp_is_summarised(model_dirs, monkeypatch, capsys):
    rc, out, _ = run_main(monkeypatch, capsys, "inspect", model_dirs("qwen3"), "--tp", "1000")
    assert rc == 1 and len(out.splitlines()) < 120
    assert "(2, 64) ranks 0-499 / (1, 64) ranks 500 / (0, 64) ranks 501-999" in out  # vocab 1001 over 1000 ranks


@pytest.mark.e2e
def test_piped_output_is_never_cut(model_dirs, tmp_path):
    """A non-terminal 80-column console (a pipe with COLUMNS=80): names, paths and numbers stay whole, one line."""
    env = {**base_env(), "COLUMNS": "80"}
    proc = subprocess.run([*TPCLI, "inspect", model_dirs("qwen3"), "--tp", "2"], capture_output=True, text=True,
                          env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any("model.layers.*.self_attn.q_proj" in ln and "colwise" in ln for ln in lines), proc.stdout
    assert any("model.layers.*.post_attention_layernorm.weight" in ln and "Replicate" in ln for ln in lines)
    assert any("elements stored by dtype: F32 125,888" in ln for ln in lines)
    assert "…" not in proc.stdout

    folder = tmp_path / "a-folder-name-long-enough-to-need-more-than-eighty-columns-in-any-log" / "sharded"
    folder.parent.mkdir()
    shard_checkpoint(str(model_dirs("qwen3")), tp=2, out=str(folder))
    next(folder.glob("shard-*.safetensors")).unlink()
    proc = subprocess.run([*TPCLI, "verify", folder], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert f"{folder}: sharded folder: FAILED" in lines  # what is known; no "tp=None, None tensors"
    assert any(str(folder) in ln and "missing" in ln for ln in lines), proc.stdout


@pytest.mark.e2e
def test_output_into_a_closed_pipe_exits_0_quietly(model_dirs):
    proc = subprocess.Popen([*TPCLI, "inspect", model_dirs("qwen3"), "--tp", "1000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=base_env())
    proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=180) == 0 and err == ""


def test_a_moved_transformers_internal_is_one_line(model_dirs, monkeypatch, capsys):
    """transformers outside the tested window + a missing internal: one warning line, one error line naming both
    versions and what failed. Inside the window the same failure is a tpcli bug and keeps its traceback."""
    import transformers.distributed.parallel_utils as pu

    model = model_dirs("qwen3")  # built first: building it imports transformers modules that need the name
    monkeypatch.delattr(pu, "replace_layer_number_by_wildcard")  # as if a release had moved it
    with pytest.raises(ImportError):  # tested versions: a bug, the traceback is the useful report
        run_main(monkeypatch, capsys, "inspect", model, "--tp", "2")
    monkeypatch.setitem(versions.TESTED, "transformers", ("5.30", "5.31"))
    rc, out, err = run_main(monkeypatch, capsys, "inspect", model, "--tp", "2")
    found = versions.installed("transformers")
    assert rc == 1 and out == ""
    assert err.splitlines()[0] == (f"Warning: tpcli {versions.__version__} is not tested with transformers {found} "
                                   "(tested: transformers 5.30-5.31); expect errors.")
    line = err.splitlines()[1]
    assert line.startswith("Error: tpcli 0.1.0 is tested with transformers 5.30-5.31 and torch ")
    assert f"found transformers {found}" in line and "replace_layer_number_by_wildcard" in line
    assert "from 'transformers.distributed.parallel_utils'" in line  # the library's module, not the adapter
    assert len(err.splitlines()) == 2


@pytest.mark.parametrize("name,slowed", [("qwen3", "tpcli.formats.bytecopy._copy_unit"),  # the byte path's threads
                                          ("mixtral", "tpcli.planning.readers.CheckpointReader.load")])  # the general path
@pytest.mark.e2e
def test_sigterm_during_shard_leaves_nothing(name, slowed, model_dirs, tmp_path):
    """A scheduler's SIGTERM mid-write cleans up like Ctrl-C: no output, no temporary folder. tpcli's own per-tensor
    step (not transformers') is slowed so that the signal lands while rank files are being written."""
    out = tmp_path / "out" / "sharded"
    out.parent.mkdir()
    started = tmp_path / "started"
    module, _, attr = slowed.rpartition(".")
    owner, _, cls = module.rpartition(".") if module.endswith("CheckpointReader") else (module, "", "")
    target = f"importlib.import_module({owner!r})" + (f".{cls}" if cls else "")
    code = (
        "import importlib, sys, time\n"
        f"target = {target}\n"
        f"real = getattr(target, {attr!r})\n"
        "def slow(*args):\n"
        f"    open({str(started)!r}, 'w').close()\n"
        "    time.sleep(0.5)\n"
        "    return real(*args)\n"
        f"setattr(target, {attr!r}, slow)\n"
        f"sys.argv = ['tpcli', 'shard', {str(model_dirs(name))!r}, '--tp', '2', '--out', {str(out)!r}]\n"
        "from tpcli.cli import main\nmain()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=base_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists() and any(out.parent.iterdir())  # mid-write: the temporary folder exists
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and err.strip() == "Error: interrupted (SIGTERM)"
    assert list(out.parent.iterdir()) == []


@pytest.mark.dist
def test_ctrl_c_during_verify_numerics_is_interrupted_not_failed(model_dirs, tmp_path):
    env = {**base_env(), "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([*TPCLI, "verify", model_dirs("qwen3"), "--tp", "2", "--numerics"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("tpcli-run-*/pid-1")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(tmp_path.glob("tpcli-run-*/pid-1")), "the numerics workers did not start"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "FAILED" not in out and _error_lines(err) == ["Error: interrupted (SIGINT); all 2 local workers stopped"]
    assert not list(tmp_path.glob("tpcli-run-*"))


def test_pyproject_declares_the_tested_window():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    for package, (low, _) in versions.TESTED.items():
        assert f'"{package}>={low}"' in text  # installable beyond the window: no upper bound
    assert '"typer>=0.29"' in text

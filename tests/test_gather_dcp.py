"""`tpcli gather` / `verify` of training checkpoints: torch DCP as accelerate/Trainer write it after FSDP2, and verl's
per-rank DTensor `torch.save` files. The oracle is the model folder the workers loaded (bit-equal weights: the
optimizer steps with lr=0); the checkpoints are written by the real torch APIs under torchrun (gloo, 2 CPU ranks)."""

import json
import os
import pickle
import shutil

import pytest
import torch
from conftest import ORACLES, load_safetensors_dir, run_main, torchrun

from tpcli.commands.gather import gather_checkpoint
from tpcli.commands.verify import verify
from tpcli.errors import CheckpointError
from tpcli.formats.train_folder import Piece, SavedTensor, check_tiling

LAYOUTS = ["pytorch_model_fsdp_0", "app", "bare", "titan", "verl"]  # see tests/oracles/fsdp_save_worker.py


@pytest.fixture(scope="module")
def saved(model_dirs, tmp_path_factory):
    """saved(model) -> folder holding the four layouts written from `model` on 2 FSDP2 ranks."""
    cache = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"fsdp-{name}")
            torchrun(2, ORACLES / "fsdp_save_worker.py", model_dirs(name), out)
            cache[name] = out
        return cache[name]

    return get


def assert_same_checkpoint(ours, original):
    x, y = load_safetensors_dir(ours), load_safetensors_dir(original)
    assert set(x) == set(y), set(x) ^ set(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def copy_layout(saved_root, layout, tmp_path):
    dst = tmp_path / layout
    shutil.copytree(saved_root / layout, dst)
    return dst


@pytest.mark.dist
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_returns_the_original_split_like_save_pretrained(saved, model_dirs, tmp_path, layout):
    original = model_dirs("llama")  # saved with max_shard_size=100KB: several files and an index
    result = gather_checkpoint(str(saved("llama") / layout), config=str(original), out=str(tmp_path / "g"),
                               max_shard_size="100KB")
    assert_same_checkpoint(tmp_path / "g", original)
    ours = json.loads((tmp_path / "g" / "model.safetensors.index.json").read_text())
    theirs = json.loads((original / "model.safetensors.index.json").read_text())
    assert ours["weight_map"] == theirs["weight_map"]
    with_optimizer = layout in ("app", "titan")
    assert result["left_out"] == ({"optimizer": result["left_out"].get("optimizer")} if with_optimizer else {})
    assert not with_optimizer or result["left_out"]["optimizer"] > 0
    assert (tmp_path / "g" / "config.json").is_file()


@pytest.mark.dist
@pytest.mark.parametrize("name,layout", [("mixtral", "app"), ("mixtral", "verl"), ("qwen3", "bare")])
def test_gather_reverts_conversions_and_drops_tied_copies(saved, model_dirs, tmp_path, name, layout):
    """Mixtral's run-time experts are fused; the output has the per-expert names of the original checkpoint. qwen3
    ties lm_head to the embeddings: the state dict holds both, the output (like save_pretrained's) one."""
    gather_checkpoint(str(saved(name) / layout), config=str(model_dirs(name)), out=str(tmp_path / "g"))
    assert_same_checkpoint(tmp_path / "g", model_dirs(name))
    assert name != "qwen3" or (tmp_path / "g" / "tokenizer.json").is_file()


@pytest.mark.dist
def test_gather_of_tp_x_fsdp_dcp(model_dirs, tmp_path):
    """TP 2 x FSDP 2 through transformers' DistributedConfig: the weights are _StridedShard x Shard DTensors, which
    DCP saves as one box per rank in an order unlike the ranks'."""
    torchrun(4, ORACLES / "fsdp_save_worker.py", model_dirs("llama4kv"), tmp_path / "ckpt", "--tp", "2")
    r = verify(str(tmp_path / "ckpt" / "app"), config=str(model_dirs("llama4kv")))
    assert r["ok"] and r["ranks"] == 4, r
    gather_checkpoint(str(tmp_path / "ckpt" / "app"), config=str(model_dirs("llama4kv")), out=str(tmp_path / "g"))
    assert_same_checkpoint(tmp_path / "g", model_dirs("llama4kv"))


@pytest.mark.dist
def test_trainer_checkpoint_folder_needs_no_config_and_casts(saved, model_dirs, tmp_path, monkeypatch, capsys):
    """Trainer writes config.json into checkpoint-N/, next to pytorch_model_fsdp_0/."""
    ckpt = tmp_path / "checkpoint-1"
    shutil.copytree(saved("llama") / "pytorch_model_fsdp_0", ckpt / "pytorch_model_fsdp_0")
    shutil.copy(model_dirs("llama") / "config.json", ckpt / "config.json")
    code, out, _ = run_main(monkeypatch, capsys, "gather", ckpt / "pytorch_model_fsdp_0", "--out", tmp_path / "g",
                            "--dtype", "bf16", "--json")
    assert code == 0 and json.loads(out)["config"] == str(ckpt)
    ours, original = load_safetensors_dir(tmp_path / "g"), load_safetensors_dir(model_dirs("llama"))
    assert set(ours) == set(original)
    assert all(torch.equal(ours[k], original[k].to(torch.bfloat16)) for k in ours)
    assert json.loads((tmp_path / "g" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["app", "verl"])
def test_verify_reports_coverage(saved, model_dirs, monkeypatch, capsys, layout):
    r = verify(str(saved("llama") / layout), config=str(model_dirs("llama")))
    assert r["ok"] and r["tensors"] == 21 and r["chunks"] == 42 and r["ranks"] == 2
    code, out, _ = run_main(monkeypatch, capsys, "verify", saved("llama") / layout, "--config", model_dirs("llama"))
    assert code == 0 and "each element covered once" in out


def _rewrite_metadata(folder, edit):
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(folder)).read_metadata()  # the test's own file: torch's reader is fine here
    edit(meta)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(meta, f)


def _storage(meta, needle):
    return next((i, s) for i, s in meta.storage_data.items() if needle in i.fqn)


def _drop_chunk(meta):
    entry = meta.state_dict_metadata["model.model.layers.0.self_attn.q_proj.weight"]
    entry.chunks = entry.chunks[:1]


def _escape(meta):
    index, info = _storage(meta, "q_proj")
    info.relative_path = "../" + info.relative_path


def _past_end(meta):
    index, info = _storage(meta, "q_proj")
    info.offset += 10**9


BROKEN = {"missing chunk": (_drop_chunk, "not fully covered"),
          "path outside": (_escape, "not a file name inside"),
          "range past the end": (_past_end, "outside the file")}


@pytest.mark.dist
@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_metadata_is_refused(saved, model_dirs, tmp_path, case):
    edit, words = BROKEN[case]
    folder = copy_layout(saved("llama"), "pytorch_model_fsdp_0", tmp_path)
    _rewrite_metadata(folder, edit)
    with pytest.raises(CheckpointError, match=words):
        gather_checkpoint(str(folder), config=str(model_dirs("llama")), out=str(tmp_path / "g"))
    assert not (tmp_path / "g").exists()
    assert not verify(str(folder), config=str(model_dirs("llama")))["ok"]


@pytest.mark.dist
def test_flipped_byte_in_a_chunk_is_refused(saved, model_dirs, tmp_path, monkeypatch, capsys):
    from torch.distributed.checkpoint import FileSystemReader

    folder = copy_layout(saved("llama"), "pytorch_model_fsdp_0", tmp_path)
    _, info = _storage(FileSystemReader(str(folder)).read_metadata(), "q_proj")
    data = bytearray((folder / info.relative_path).read_bytes())
    data[info.offset + info.length - 2000] ^= 0x40  # inside the tensor's bytes (the zip directory is after them)
    (folder / info.relative_path).write_bytes(bytes(data))
    code, _, err = run_main(monkeypatch, capsys, "gather", folder, "--config", model_dirs("llama"),
                            "--out", tmp_path / "g")
    assert code == 1 and "CRC-32" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "g").exists()
    assert not verify(str(folder), config=str(model_dirs("llama")))["ok"]
    assert verify(str(folder), config=str(model_dirs("llama")), quick=True)["ok"]  # --quick: coverage only


@pytest.mark.dist
@pytest.mark.parametrize("layout,victim", [("pytorch_model_fsdp_0", "__1_0.distcp"),
                                           ("verl", "model_world_size_2_rank_1.pt")])
def test_missing_rank_file_is_refused(saved, model_dirs, tmp_path, layout, victim):
    folder = copy_layout(saved("llama"), layout, tmp_path)
    (folder / victim).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        gather_checkpoint(str(folder), config=str(model_dirs("llama")), out=str(tmp_path / "g"))


@pytest.mark.dist
@pytest.mark.parametrize("other,words", [("llama3", "shapes differ from the config: model.embed_tokens.weight"),
                                         ("mixtral", "which MixtralForCausalLM")])
def test_wrong_config_is_refused_naming_the_first_tensors(saved, model_dirs, tmp_path, other, words):
    with pytest.raises(CheckpointError, match=words) as exc:
        gather_checkpoint(str(saved("llama") / "app"), config=str(model_dirs(other)), out=str(tmp_path / "g"))
    assert "more)" in str(exc.value) and not (tmp_path / "g").exists()


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_metadata_pickle_is_refused_and_not_run(tmp_path, model_dirs):
    marker = tmp_path / "ran"
    cases = {"plain": pickle.dumps(Evil(marker)),
             # a dotted name through an allowed module: torch...filesystem imports os
             "dotted": f"ctorch.distributed.checkpoint.filesystem\nos.system\n(S'touch {marker}'\ntR.".encode()}
    for name, payload in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / ".metadata").write_bytes(payload)
        with pytest.raises(CheckpointError, match="not DCP metadata"):
            gather_checkpoint(str(folder), config=str(model_dirs("llama")), out=str(tmp_path / f"g-{name}"))
        assert not marker.exists(), name


@pytest.mark.dist
def test_hostile_rank_pickle_is_refused_and_not_run(saved, model_dirs, tmp_path):
    folder = copy_layout(saved("llama"), "verl", tmp_path)
    marker = tmp_path / "ran"
    torch.save({"model.embed_tokens.weight": Evil(marker)}, folder / "model_world_size_2_rank_1.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        gather_checkpoint(str(folder), config=str(model_dirs("llama")), out=str(tmp_path / "g"))
    assert not marker.exists()


def test_wrapper_prefixes_are_removed_and_verify_is_never_cached(model_dirs, tmp_path, monkeypatch):
    """torch.compile (`_orig_mod.`), DDP (`module.`) and FSDP1/activation checkpointing wrappers leave their names in
    the keys; a training checkpoint's verify result is not cached (its files can change under the same path)."""
    from tpcli.commands.gather_train import saved_names
    from tpcli.formats import cache
    from tpcli.formats.train_folder import TrainFolder
    from tpcli.planning.plan import load_config, resolve_plan

    plan = resolve_plan(load_config(model_dirs("llama")))
    wrapped = {n: ("module._orig_mod." + n).replace("layers.0.", "layers.0._checkpoint_wrapped_module.")
               for n in plan.tensors}
    tf = TrainFolder(path=tmp_path, kind="dcp", files={}, left_out={},
                     tensors={k: SavedTensor(k, "float32", plan.tensors[n].shape) for n, k in wrapped.items()})
    assert saved_names(tf, plan) == wrapped
    (tmp_path / ".metadata").write_bytes(b"")
    monkeypatch.setenv("TPCLI_CACHE_DIR", str(tmp_path / "cache"))
    assert cache.key("verify", {"target": str(tmp_path)}) is None


def _tensor(shape, boxes):
    return SavedTensor("w", "float32", shape, [Piece("f", o, s) for o, s in boxes])


@pytest.mark.parametrize("boxes,words", [
    ([((0, 0), (2, 4)), ((2, 0), (2, 4))], None),  # FSDP Shard(0)
    ([((0, 0), (2, 2)), ((0, 2), (2, 2)), ((2, 0), (2, 2)), ((2, 2), (2, 2))], None),  # a 2x2 grid (TP x FSDP)
    ([((0, 0), (4, 2)), ((0, 2), (2, 2)), ((2, 2), (2, 2))], None),  # not a product grid
    ([((0, 0), (2, 4)), ((1, 0), (2, 4)), ((3, 0), (1, 4))], "overlaps"),
    ([((0, 0), (2, 4)), ((3, 0), (1, 4))], "not fully covered"),
    ([((0, 0), (2, 4)), ((2, 0), (3, 4))], "outside its shape"),
])
def test_check_tiling(tmp_path, boxes, words):
    t = _tensor((4, 4), boxes)
    if words is None:
        check_tiling(tmp_path, t)
    else:
        with pytest.raises(CheckpointError, match=words):
            check_tiling(tmp_path, t)

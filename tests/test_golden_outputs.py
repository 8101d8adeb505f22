"""Shard and gather outputs byte-identical before and after a refactor of the core (issue 35).

Tiny models whose every weight is drawn from a per-name seeded generator (independent of transformers' init), put
through shard (byte copy and stream paths, casts, uneven tp, conversions, pp, reshard) and gather (manifest fast path,
general path, casts, several output files). The sha256 of every output file is compared with
tests/data/golden_outputs.json, written by the code before the refactor (`TPCLI_WRITE_GOLDEN=1 pytest
tests/test_golden_outputs.py`). tpcli.json is compared without its fields that name versions or times.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "data" / "golden_outputs.json"
VOLATILE = ("versions", "source")  # tool versions; the input's path (a temporary folder)

# name -> (kind, build overrides)
MODELS = {
    "qwen3": ("qwen3", {}),  # tied embeddings
    "llama3": ("llama", {"heads": 6, "kv_heads": 6, "hidden": 96, "max_shard_size": "100KB"}),  # tp=3, several files
    "mixtral": ("mixtral", {}),  # conversions (per-expert on disk, fused at run time)
}

# case -> list of steps; each step: (command, source, out, kwargs); source "model:NAME" or an earlier out
CASES = {
    "qwen3-tp2": [("shard", "model:qwen3", "tp2", {"tp": 2}),
                  ("gather", "tp2", "merged", {}),
                  ("gather", "tp2", "merged-general", {"byte_copy": False}),
                  ("gather", "tp2", "merged-bf16", {"dtype": "bfloat16"})],
    "qwen3-stream-bf16": [("shard", "model:qwen3", "tp2", {"tp": 2, "dtype": "bfloat16"}),
                          ("shard", "model:qwen3", "tp2-stream", {"tp": 2, "byte_copy": False})],
    "llama3-tp3": [("shard", "model:llama3", "tp3", {"tp": 3}),
                   ("gather", "tp3", "merged", {"max_shard_size": "200KB"}),
                   ("shard", "tp3", "tp2", {"tp": 2})],
    "mixtral-tp2": [("shard", "model:mixtral", "tp2", {"tp": 2}),
                    ("gather", "tp2", "merged", {})],
    "qwen3-pp2": [("shard", "model:qwen3", "pp2", {"tp": 1, "pp": 2}),
                  ("gather", "pp2", "merged", {})],
}


def _seeded_model(kind: str, out: Path, overrides: dict) -> Path:
    """build_tiny, then every tensor redrawn from a generator seeded by its name (crc32), in its own dtype."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tpcli.testing import build_tiny

    build_tiny(kind, out, **overrides)
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            meta = sf.metadata()
            tensors = {}
            for name in sf.keys():
                t = sf.get_tensor(name)
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                tensors[name] = (torch.randn(t.shape, generator=g) * 0.05).to(t.dtype)
        save_file(tensors, f, metadata=meta)
    return out


def _strip(doc):
    if isinstance(doc, dict):
        return {k: _strip(v) for k, v in doc.items() if k not in VOLATILE}
    if isinstance(doc, list):
        return [_strip(v) for v in doc]
    return doc


def _digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        if rel == "tpcli.json":
            data = json.dumps(_strip(json.loads(p.read_text())), sort_keys=True).encode()
        else:
            data = p.read_bytes()
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def _run_case(steps, models: dict, root: Path) -> dict:
    from tpcli.commands.gather import gather_checkpoint
    from tpcli.commands.shard import shard_checkpoint

    digests = {}
    for command, src, out, kwargs in steps:
        source = models[src.split(":", 1)[1]] if src.startswith("model:") else root / src
        if command == "shard":
            shard_checkpoint(str(source), out=str(root / out), **kwargs)
        else:
            gather_checkpoint(str(source), out=str(root / out), **kwargs)
        digests[out] = _digest(root / out)
    return digests


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden-models")
    return {name: _seeded_model(kind, root / name, dict(over)) for name, (kind, over) in MODELS.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_byte_identical(case, seeded, tmp_path):
    got = _run_case(CASES[case], seeded, tmp_path)
    if os.environ.get("TPCLI_WRITE_GOLDEN") == "1":
        doc = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        doc[case] = got
        GOLDEN.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden outputs written")
    want = json.loads(GOLDEN.read_text())[case]
    assert got == want


def test_golden_check_fails_on_a_changed_byte(seeded, tmp_path):
    """The comparison sees one flipped byte in one rank file (the check can fail)."""
    got = _run_case(CASES["qwen3-tp2"][:1], seeded, tmp_path)
    f = tmp_path / "tp2" / [n for n in sorted(got["tp2"]) if n.endswith(".safetensors")][-1]
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    assert _digest(tmp_path / "tp2") != json.loads(GOLDEN.read_text())["qwen3-tp2"]["tp2"]

"""tpcli.formats.heap.reuse_freed_memory: a streaming pass reuses freed tensor buffers instead of faulting in fresh pages."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

LOOP = """
import resource, sys, torch
from tpcli.formats.heap import reuse_freed_memory
if sys.argv[1] == "on":
    reuse_freed_memory()
sizes = [22 * 2**20, 22 * 2**20, 22 * 2**20, 8 * 2**20]  # a layer of the bench Llama: MLP weights, o_proj
def step():
    held = [torch.empty(n, dtype=torch.uint8).fill_(1) for n in sizes]  # read, sliced, written, freed
    del held
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="needs glibc's mallopt")
def test_reuse_freed_memory_stops_page_faults_per_tensor():
    faults = {mode: int(subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("off", "on")}
    pages = 10 * sum([22, 22, 22, 8]) * 2**20 // 4096
    assert faults["off"] > pages / 2  # glibc's default: fresh pages for most buffers, every step
    assert faults["on"] < faults["off"] / 3  # reused (measured: 129k -> 32k faults)


@pytest.mark.parametrize("name", ["mixtral", "llama", "qwen3_moe"])
def test_revert_with_the_mapping_built_once_equals_transformers(model_dirs, name):
    """Conversions attaches the reverse mapping once (not rebuilt per group); the result must stay transformers' own
    `revert_weight_conversion` of a model that has none attached, group by group (names, shapes, order)."""
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    from tpcli.planning.convert import Conversions
    from tpcli.planning.plan import build_meta_model, load_config

    config = load_config(model_dirs(name))
    model, fresh = build_meta_model(config), build_meta_model(config)
    conv = Conversions(model)
    meta = {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in model.state_dict().items()}
    groups = conv.reverse_groups(list(meta))
    for group in groups:
        ours = conv.revert({n: meta[n] for n in group})
        theirs = revert_weight_conversion(fresh, {n: meta[n] for n in group})
        assert [(k, tuple(v.shape)) for k, v in ours.items()] == [(k, tuple(v.shape)) for k, v in theirs.items()]
    assert getattr(fresh, "_weight_conversions", None) is None
    changed = any(list(conv.revert({n: meta[n] for n in g})) != g for g in groups)
    assert changed == (name != "llama")  # the MoE models do convert (fused experts -> per-expert keys)

"""tpcli.formats.heap.reuse_freed_memory: a streaming pass reuses freed tensor buffers instead of faulting in fresh pages."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

LOOP = """
import ctypes, resource, torch
from tpcli.formats.heap import reuse_freed_memory
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages only, whatever huge pages are free now
sizes = [22 * 2**20, 22 * 2**20, 22 * 2**20, 8 * 2**20]  # a layer of the bench Llama: MLP weights, o_proj
def step():
    held = [torch.empty(n, dtype=torch.uint8).fill_(1) for n in sizes]  # read, sliced, written, freed
    del held
def faults():
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
off = faults()  # glibc's defaults first: once set, the thresholds stay for the process
reuse_freed_memory()
print(off, faults())
"""


@pytest.mark.e2e
@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="needs glibc's mallopt")
def test_reuse_freed_memory_stops_page_faults_per_tensor():
    """Page faults of the same ten steps, without then with the setting, in one process: a count of what the kernel
    did for this process (not a timing), compared with a wide margin (measured: 122k -> 0 faults)."""
    off, on = map(int, subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True,
                                      check=True).stdout.split())
    pages = 10 * sum([22, 22, 22, 8]) * 2**20 // 4096
    assert off > pages / 4, (off, on)  # glibc's default: fresh pages for many buffers, every step
    assert on < off / 4, (off, on)  # reused


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

"""inspect's per-rank figures as runs of ranks: the report is O(distinct layouts), and expands back exactly."""

import json

from conftest import run_main

from tpcli.commands.inspect import expand_runs, local_shapes
from tpcli.formats.units import tensor_bytes
from tpcli.planning.layout import local_shape
from tpcli.planning.memory import MemoryOptions, rank_memory
from tpcli.planning.plan import load_config, resolve_plan

MEMORY_FLAGS = ("--batch", "2", "--seq-len", "40", "--train")


def _inspect(monkeypatch, capsys, model, tp: int) -> tuple[str, dict]:
    _, out, _ = run_main(monkeypatch, capsys, "inspect", str(model), "--tp", str(tp), *MEMORY_FLAGS, "--json")
    return out, json.loads(out)


def _per_rank_oracle(model, tp: int) -> tuple[dict[str, list], list[dict]]:
    """Each group's local shape per rank and each rank's memory row, computed rank by rank (no runs involved)."""
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    plan = resolve_plan(load_config(model))
    shapes: dict[str, list] = {}
    rows = [{"rank": r, "sharded_bytes": 0, "replicated_bytes": 0} for r in range(tp)]
    for t in plan.unique_tensors:
        mine = [list(local_shape(t.shape, t.placement, tp, r)) for r in range(tp)]
        assert shapes.setdefault(replace_layer_number_by_wildcard(t.name), mine) == mine  # a group shares its layout
        for r in range(tp):
            rows[r]["sharded_bytes" if t.placement.is_sharded else "replicated_bytes"] += tensor_bytes(t.dtype, mine[r])
    for row, mem in zip(rows, rank_memory(plan, tp, MemoryOptions(batch=2, seq_len=40, train=True)), strict=True):
        row.update(mem.to_dict())
    return shapes, rows


def test_runs_expand_to_every_ranks_figures(model_dirs, monkeypatch, capsys):
    model = model_dirs("qwen3")  # vocab 1001 at tp=4: 251 / 251 / 251 / 248 rows (torch.chunk)
    for tp in (4, 1024):
        _, doc = _inspect(monkeypatch, capsys, model, tp)
        shapes, rows = _per_rank_oracle(model, tp)
        assert {g["pattern"]: local_shapes(g) for g in doc["tp"]["groups"]} == shapes
        # the memory terms; the step figures (tpcli.planning.step) ride along and are checked in tests/test_step.py
        assert [{k: row[k] for k in rows[0]} for row in expand_runs(doc["tp"]["rank_runs"])] == rows
        largest = max(rows, key=lambda r: r["total_bytes"])
        assert doc["tp"]["largest_rank"] == largest["rank"]
        if tp == 4:
            embed = next(g for g in doc["tp"]["groups"] if g["pattern"] == "model.embed_tokens.weight")
            assert [(s["first"], s["last"], s["shape"][0]) for s in embed["local_shapes"]] == [(0, 2, 251), (3, 3, 248)]


def test_inspect_tp1024_json_is_as_small_as_tp2(model_dirs, monkeypatch, capsys):
    model = model_dirs("qwen3")
    small, _ = _inspect(monkeypatch, capsys, model, 2)
    large, doc = _inspect(monkeypatch, capsys, model, 1024)
    assert doc["tp"]["size"] == 1024 and len(expand_runs(doc["tp"]["rank_runs"])) == 1024
    # schema 3 wrote ~1 MB here; the runs add a few entries per tensor group (ceil / floor / empty), not one per rank
    assert len(large.encode()) < 1.5 * len(small.encode()) + 8_192, (len(large), len(small))

"""`tpcli inspect`: what a TP plan does to a model, per rank, without loading a weight.

The result is one JSON-ready dict (documented in docs/cli.md, "inspect"); `tpcli.render` draws it.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from tpcli.errors import ModelError, TpcliError
from tpcli.formats import source as sources
from tpcli.formats.units import tensor_bytes
from tpcli.planning.checks import check_plan, valid_tp_sizes
from tpcli.planning.layout import local_shape
from tpcli.planning.memory import (
    MemoryOptions,
    cache_layers,
    check_budget,
    check_trainable,
    fit_table,
    largest_per_tp,
    rank_memory,
)
from tpcli.planning.mesh import mesh_findings, mesh_memory
from tpcli.planning.mesh_fit import fit_meshes
from tpcli.planning.plan import ResolvedPlan, load_config, load_plan_file, resolve_plan, rule_matches
from tpcli.planning.quant import scale_pairs

SCHEMA = "tpcli.inspect/4"  # 3: `mesh`; 4: per-rank figures as runs of ranks (`local_shapes` items, `tp.rank_runs`)


def load_resolved(model: str, *, plan_file: str | None = None, revision: str | None = None,
                  weights: bool = False) -> tuple[sources.Source, ResolvedPlan]:
    """Resolve MODEL and its effective plan (the start of every command)."""
    src = sources.resolve(model, revision=revision, weights=weights)
    user_plan = load_plan_file(plan_file) if plan_file else None
    config = load_config(src.path)
    try:
        return src, resolve_plan(config, user_plan=user_plan, plan_file=plan_file)
    except TpcliError:
        raise
    except Exception as exc:
        if not _raised_by_transformers_model(exc):
            raise
        raise ModelError(f"{src.path / 'config.json'}: transformers cannot build {config.model_type!r} from this config "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                         "fix the config or use a transformers version that builds it.") from None


def _raised_by_transformers_model(exc: BaseException) -> bool:
    """Whether `exc` came out of transformers' own model or config code (its innermost frame is in transformers)."""
    import transformers

    tb = exc.__traceback__
    root = str(Path(transformers.__file__).parent)
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and last.startswith(root)


def inspect_model(model: str, *, tp: int | None = None, plan_file: str | None = None,
                  revision: str | None = None, max_tp: int = 64, memory: MemoryOptions | None = None,
                  gpu_mem: int | None = None, reserve: int = 0, mesh=None, gpus: int | None = None,
                  gpus_per_node: int | None = None, timing: dict | None = None) -> dict:
    if gpu_mem is not None:
        check_budget(gpu_mem, reserve)
    src, plan = load_resolved(model, plan_file=plan_file, revision=revision)
    if memory and memory.train:
        check_trainable(plan)
    report = build_report(src, plan, tp=tp, max_tp=max_tp)
    add_memory(report, plan, memory or MemoryOptions(), gpu_mem=gpu_mem, reserve=reserve)
    report["mesh"] = mesh_memory(plan, mesh, memory or MemoryOptions()) if mesh is not None else None
    add_step(report, plan, memory or MemoryOptions(), mesh)
    if mesh is not None:  # the experts follow the EP plan, not their TP rules; shards FSDP would leave empty
        report["tp"]["findings"] = mesh_findings(plan, mesh, report["tp"]["findings"], as_dicts=True)
        report["tp"]["valid"] = not any(f["severity"] == "error" for f in report["tp"]["findings"])
    if gpus is not None:
        report["fit"].update(fit_meshes(plan, memory or MemoryOptions(), world=gpus, per_node=gpus_per_node,
                                        valid_tp=report["valid_tp_sizes"], gpu_mem=gpu_mem, reserve=reserve))
        if memory and memory.train and memory.seq_len:  # fitting meshes by estimated step time
            from tpcli.planning.steptime import load_hardware, pick_gpu, rank_by_time

            timing = timing or {}
            chosen = pick_gpu(load_hardware(timing.get("hardware")), timing.get("gpu"), timing.get("mfu"))
            rank_by_time(plan, report["fit"], batch=memory.batch, seq_len=memory.seq_len,
                         checkpointing=memory.gradient_checkpointing, gpu=chosen, gpu_named=bool(timing.get("gpu")))
    return report


def add_step(report: dict, plan: ResolvedPlan, opts: MemoryOptions, mesh) -> None:
    """With --seq-len, on every rank of `tp.rank_runs` and `mesh.ranks` (tpcli.planning.step):
    `inference_comm_bytes` {"prefill", "decode_token"} of generate(), and with --train `activation_bytes` and
    `comm_bytes` of one training step. A model whose modules the step model does not cover gets None there and
    `memory.step_unmodelled` (the reason; None when modelled)."""
    from tpcli.planning.mesh import Mesh
    from tpcli.planning.step import StepUnmodelled, inference_ranks, step_ranks

    if not opts.seq_len:
        return
    report["memory"]["step_unmodelled"] = None
    targets = []
    if report["tp"]:
        targets.append(("tp", Mesh(tp=report["tp"]["size"])))
    if report.get("mesh"):
        targets.append(("mesh", mesh))
    for where, m in targets:
        try:
            costs = [{"inference_comm_bytes": c} for c in inference_ranks(plan, m, opts.batch, opts.seq_len)]
            if opts.train:
                for row, c in zip(costs, step_ranks(plan, m, opts.batch, opts.seq_len, opts.gradient_checkpointing),
                                  strict=True):
                    row.update(c)
        except StepUnmodelled as exc:
            report["memory"]["step_unmodelled"] = str(exc)
            none = {"inference_comm_bytes": None}
            costs = [{**none, "activation_bytes": None, "comm_bytes": None} if opts.train else none] * m.world
        if where == "tp":
            ranks = expand_runs(report["tp"]["rank_runs"])
            for row, c in zip(ranks, costs, strict=True):
                row.update(c)
            report["tp"]["rank_runs"] = rank_runs_of(ranks)
        else:
            for row, c in zip(report["mesh"]["ranks"], costs, strict=True):
                row.update(c)


def add_memory(report: dict, plan: ResolvedPlan, opts: MemoryOptions, *, gpu_mem: int | None, reserve: int) -> None:
    """Per-rank memory (tpcli.planning.memory) into `report`: `tp.rank_runs` terms, `memory` per TP size, and `fit`.

    `total_bytes` of a rank becomes weights + KV cache + gradients + optimizer + activation estimate (the terms
    not asked for are 0); `sharded_bytes + replicated_bytes` stays the weights.
    """
    asked = bool(opts.seq_len or opts.train or gpu_mem)
    tp = report["tp"]
    if tp:
        ranks = expand_runs(tp["rank_runs"])
        for row, mem in zip(ranks, rank_memory(plan, tp["size"], opts), strict=True):
            row.update(mem.to_dict())
        tp["largest_rank"] = max(ranks, key=lambda r: r["total_bytes"])["rank"]
        tp["rank_runs"] = rank_runs_of(ranks)
    per_tp = largest_per_tp(plan, report["valid_tp_sizes"], opts) if asked else {}
    report["memory"] = {
        "batch": opts.batch,
        "seq_len": opts.seq_len,
        "kv_dtype": opts.kv_dtype or plan.dtype,
        "train": opts.train,
        "per_tp": {str(n): m.to_dict() for n, m in per_tp.items()},  # the largest rank of each valid TP size
        # one entry per kind of cache layer (tpcli.planning.memory.cache_layers), at every valid TP size and --tp
        "cache_layers": cache_layers(plan, sorted({*report["valid_tp_sizes"], *([tp["size"]] if tp else [])}), opts),
    } if asked else None
    report["fit"] = fit_table(plan, per_tp, opts, gpu_mem=gpu_mem, reserve=reserve) if gpu_mem is not None else None


def build_report(src: sources.Source, plan: ResolvedPlan, *, tp: int | None, max_tp: int = 64) -> dict:
    from tpcli.adapters.transformers_api import replace_layer_number_by_wildcard

    unique = plan.unique_tensors
    sharded_bytes = sum(t.nbytes for t in unique if t.placement.is_sharded)
    matches = rule_matches(plan)
    rules = []
    for rule, style in plan.rules.items():
        names = matches[rule]
        covered = [t for t in unique if t.rule == rule]
        rules.append({
            "rule": rule,
            "style": style,
            "matches": len(names),
            "parameters": len(covered),
            "bytes_sharded": sum(t.nbytes for t in covered if t.placement.is_sharded),
        })
    valid, invalid = valid_tp_sizes(plan, max_tp)
    replicated = sorted((t for t in unique if not t.placement.is_sharded), key=lambda t: -t.nbytes)
    report: dict = {
        "schema": SCHEMA,
        "source": src.describe(),
        "summary": {
            "architecture": plan.architecture,
            "model_type": plan.model_type,
            "parameters": plan.parameter_count,
            "dtype": plan.dtype,
            "total_bytes": plan.total_bytes,
            "plan_source": plan.plan_source,
            "quantization": quantization_summary(plan),
        },
        "checkpoint": sources.checkpoint_summary(src),
        "plan": rules,
        "unused_rules": [r["rule"] for r in rules if r["matches"] == 0],
        "valid_tp_sizes": valid,
        "invalid_tp_sizes": {str(k): v for k, v in invalid.items()},
        "coverage": {
            "sharded_bytes": sharded_bytes,
            "replicated_bytes": plan.total_bytes - sharded_bytes,
            "sharded_fraction": sharded_bytes / plan.total_bytes if plan.total_bytes else 0.0,
            "largest_replicated": [{"name": t.name, "shape": list(t.shape), "bytes": t.nbytes} for t in replicated[:5]],
        },
        "tp": None,
    }
    if tp:
        groups: OrderedDict[str, dict] = OrderedDict()
        per_rank = [{"rank": r, "sharded_bytes": 0, "replicated_bytes": 0} for r in range(tp)]
        for t in unique:
            shapes = [list(local_shape(t.shape, t.placement, tp, r)) for r in range(tp)]
            key = replace_layer_number_by_wildcard(t.name)
            g = groups.setdefault(key, {"pattern": key, "count": 0, "style": t.style, "placement": t.placement.describe(),
                                        "dtype": t.dtype, "global_shape": list(t.shape),
                                        "local_shapes": [{"first": a, "last": b, "shape": v} for a, b, v in runs(shapes)]})
            g["count"] += 1
            for r in range(tp):
                b = tensor_bytes(t.dtype, shapes[r])
                per_rank[r]["sharded_bytes" if t.placement.is_sharded else "replicated_bytes"] += b
        for r in per_rank:
            r["total_bytes"] = r["sharded_bytes"] + r["replicated_bytes"]
        largest = max(per_rank, key=lambda r: r["total_bytes"])
        findings = check_plan(plan, tp)
        report["tp"] = {
            "size": tp,
            "valid": tp in valid,
            "groups": list(groups.values()),
            "rank_runs": rank_runs_of(per_rank),
            "largest_rank": largest["rank"],
            "findings": [f.to_dict() for f in findings],
        }
    return report


def runs(values: list) -> list[tuple[int, int, object]]:
    """Consecutive ranks with equal values as (first, last, value): [a, a, b] -> [(0, 1, a), (2, 2, b)].

    A TP split gives each rank one contiguous slice, so a tensor has at most a few distinct local shapes (ceil,
    floor, empty) in runs: the report is O(distinct layouts), not O(tp x tensors)."""
    out: list[list] = []
    for r, v in enumerate(values):
        if out and out[-1][2] == v:
            out[-1][1] = r
        else:
            out.append([r, r, v])
    return [(a, b, v) for a, b, v in out]


def rank_runs_of(ranks: list[dict]) -> list[dict]:
    """Per-rank rows [{rank, ...figures}] as runs [{first, last, ...figures}] of consecutive ranks with equal figures."""
    figures = [{k: v for k, v in row.items() if k != "rank"} for row in ranks]
    return [{"first": a, "last": b, **v} for a, b, v in runs(figures)]


def expand_runs(rank_runs: list[dict]) -> list[dict]:
    """The per-rank rows back from `tp.rank_runs` (or a group's `local_shapes`): one dict per rank, with "rank"
    in place of "first"/"last", exactly the figures of each rank."""
    return [{"rank": r, **{k: v for k, v in run.items() if k not in ("first", "last")}}
            for run in rank_runs for r in range(run["first"], run["last"] + 1)]


def local_shapes(group: dict) -> list[list[int]]:
    """A group's local shape on each rank, expanded from its runs."""
    return [row["shape"] for row in expand_runs(group["local_shapes"])]


def quantization_summary(plan: ResolvedPlan) -> dict | None:
    """null for an ordinary checkpoint; else the method, block size, and what the stored weights and scales are.

    Every byte figure of a quantized model is its stored size: FP8 weights 1 byte per parameter plus their scales."""
    q = plan.quantization
    if q is None:
        return None
    pairs = scale_pairs(plan.tensors)
    weights = [plan.tensors[w] for w in pairs]
    scales = [plan.tensors[s] for s in pairs.values()]
    return {**q.describe(), "quantized_tensors": len(pairs),
            "weight_dtype": weights[0].dtype if weights else None, "scale_dtype": scales[0].dtype if scales else None,
            "weight_bytes": sum(t.nbytes for t in weights), "scale_bytes": sum(t.nbytes for t in scales)}

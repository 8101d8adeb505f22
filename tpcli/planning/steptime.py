"""An ESTIMATE of one training step's time per mesh: compute from the model's FLOPs, communication from the step's
collectives (`tpcli.planning.step`) over the links of a GPU catalogue (tpcli/planning/hardware.json).

For one rank of a mesh (B sequences of L tokens per data-parallel rank, N = B x L):

    FLOPs     = c x [2 N (P_dense / tp + P_experts x k / E / e_div) + 2 layers x B x L^2 x q / tp]
                c = 3 (forward + backward = 3 forwards), 4 with gradient checkpointing (one more forward);
                P_dense = the parameters of the matrix products (every weight with 2+ dims except the input
                embedding; a tied lm_head counted), P_experts = the routed experts' parameters, k of E experts per
                token, e_div = tp unless EP takes the experts (then 1: whole experts, every slot computed once);
                2 B L^2 q: causal attention, QK^T and AV (4 B L^2 q) halved by the mask, q = heads x head_dim
    compute_s = FLOPs / (bf16_flops x mfu)            (mfu: the fraction of the datasheet peak reached, default 0.4)
    comm_s    = sum over (mesh dim, collective) of f x bytes / bandwidth(link of that dim)
                f = 2 (n - 1) / n for all_reduce (ring), (n - 1) / n for all_gather, reduce_scatter, all_to_all;
                n the dim's size; bytes = `comm_bytes` of the slowest rank (whole buffers);
                link: the GPU's intra-node link when the dim's group fits inside a node, else `inter_link`
                (groups: tp = consecutive ranks; fsdp = tp x fsdp consecutive ranks; ep = ep consecutive ranks;
                efsdp = tp x fsdp consecutive ranks; dp_replicate = the whole world)
    step_s    = compute_s + comm_s (no overlap assumed: an upper estimate; max(compute_s, comm_s) is the bound
                with perfect overlap)
Every figure here is an ESTIMATE: datasheet peaks, nominal bandwidths, ring algorithms, no kernel launch, latency or
pipeline-bubble terms.
"""

from __future__ import annotations

import math
from pathlib import Path

from tpcli.errors import UsageError
from tpcli.planning.mesh import Mesh

CATALOGUE = Path(__file__).with_name("hardware.json")
FORMULA = ("step_s = compute_s + comm_s; compute_s = c x (2 N P_active_per_rank + 2 layers B L^2 q / tp) / "
           "(bf16_flops x mfu), c = 3 (4 with gradient checkpointing); comm_s = sum f x bytes / link bandwidth, "
           "f = 2(n-1)/n all_reduce, (n-1)/n all_gather / reduce_scatter / all_to_all")
_RING = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0, "all_to_all": 1.0}
_GPU_KEYS = {"memory", "bf16_flops", "intra_link"}
_MAX_ENTRIES = 256


def load_hardware(path: str | None = None) -> dict:
    """The catalogue, with the entries of `path` (inspect --hardware FILE, same layout) merged over it."""
    from tpcli.formats.jsonfile import read_json

    doc = read_json(CATALOGUE, what="tpcli's hardware catalogue")
    if path is None:
        return doc
    fix = "see tpcli/planning/hardware.json for the layout"
    user = read_json(path, what="--hardware", fix=fix, max_bytes=2**20)
    if not isinstance(user, dict) or set(user) - {"gpus", "links", "inter_link", "mfu", "_about"}:
        raise UsageError(f"--hardware {path}: expected an object with gpus, links, inter_link, mfu; {fix}.")
    for section in ("gpus", "links"):
        entries = user.get(section, {})
        if not isinstance(entries, dict) or len(entries) > _MAX_ENTRIES:
            raise UsageError(f"--hardware {path}: '{section}' must be an object of at most {_MAX_ENTRIES} entries.")
        for name, entry in entries.items():
            allowed = _GPU_KEYS if section == "gpus" else {"bytes_per_s"}
            if not isinstance(entry, dict) or set(entry) - allowed:
                raise UsageError(f"--hardware {path}: {section}.{name} may only hold {sorted(allowed)}.")
            merged = {**doc[section].get(name, {}), **entry}
            for key in ("bf16_flops", "bytes_per_s"):
                if key in merged and not _positive(merged[key]):
                    raise UsageError(f"--hardware {path}: {section}.{name}.{key} must be a positive number.")
            if section == "gpus" and set(merged) != _GPU_KEYS:
                raise UsageError(f"--hardware {path}: gpus.{name} needs {sorted(_GPU_KEYS)} (a new GPU: all three).")
            doc[section][name] = merged
    if "inter_link" in user:
        doc["inter_link"] = user["inter_link"]
    if "mfu" in user:
        doc["mfu"] = user["mfu"]
    for name, gpu in doc["gpus"].items():
        if gpu["intra_link"] not in doc["links"]:
            raise UsageError(f"--hardware {path}: gpus.{name}.intra_link {gpu['intra_link']!r} is not a link "
                             f"({', '.join(sorted(doc['links']))}).")
    if doc["inter_link"] not in doc["links"]:
        raise UsageError(f"--hardware {path}: inter_link {doc['inter_link']!r} is not a link.")
    if not (_positive(doc["mfu"]) and doc["mfu"] <= 1):
        raise UsageError(f"--hardware {path}: mfu must be in (0, 1].")
    return doc


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def pick_gpu(hardware: dict, name: str | None, mfu: float | None) -> dict:
    """The GPU the estimate runs on: {"name", "bf16_flops", "intra_link", "intra_bytes_per_s", "inter_link",
    "inter_bytes_per_s", "mfu", "memory"}; `name` None: H100 (said so in the assumptions)."""
    name = name or "H100"
    key = next((k for k in hardware["gpus"] if k.lower() == name.lower()), None)
    if key is None:
        raise UsageError(f"--gpu {name}: not in the catalogue ({', '.join(hardware['gpus'])}); add it with "
                         "--hardware FILE.")
    if mfu is not None and not (0 < mfu <= 1):
        raise UsageError(f"--mfu {mfu}: the fraction of the peak reached must be in (0, 1], e.g. 0.4.")
    gpu = hardware["gpus"][key]
    return {"name": key, "memory": gpu["memory"], "bf16_flops": gpu["bf16_flops"], "intra_link": gpu["intra_link"],
            "intra_bytes_per_s": hardware["links"][gpu["intra_link"]]["bytes_per_s"],
            "inter_link": hardware["inter_link"],
            "inter_bytes_per_s": hardware["links"][hardware["inter_link"]]["bytes_per_s"],
            "mfu": mfu if mfu is not None else hardware["mfu"]}


def flop_params(plan) -> tuple[int, int, int]:
    """(P_dense, P_experts, experts E): parameters that take part in matrix products, read off the plan's tensors.

    A 3-D expert tensor (E, out, in) is an expert parameter; 2-D weights are dense, except the input embedding
    (a lookup); a tied lm_head is counted once more (it multiplies); norms and biases (1-D) are left out."""
    model = plan.model
    embed = next(n for n, m in model.named_modules() if m is model.get_input_embeddings()) + ".weight"
    dense = experts = count = 0
    for t in plan.tensors.values():
        if len(t.shape) == 3:
            experts += t.numel
            count = max(count, t.shape[0])
        elif len(t.shape) == 2 and t.name != embed:
            dense += t.numel  # a tied lm_head appears here under its own name
    return dense, experts, count


def step_flops(plan, mesh: Mesh, batch: int, seq_len: int, checkpointing: bool) -> float:
    """FLOPs of one training step on one rank (module docstring)."""
    text = plan.config.get_text_config(decoder=True)
    dense, experts, count = flop_params(plan)
    k = getattr(text, "num_experts_per_tok", None) or 0
    n = batch * seq_len
    active = dense / mesh.tp + (experts * k / count / (1 if mesh.ep > 1 else mesh.tp) if count else 0)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    q = text.num_attention_heads * head_dim
    attention = 2 * text.num_hidden_layers * batch * seq_len ** 2 * q / mesh.tp
    return (4 if checkpointing else 3) * (2 * n * active + attention)


def group_size_and_link(mesh: Mesh, group: str, per_node: int) -> tuple[int, bool]:
    """(ranks in the group, whether the group stays inside a node)."""
    span = {"tp": (mesh.tp, mesh.tp), "fsdp": (mesh.fsdp, mesh.tp * mesh.fsdp), "ep": (mesh.ep, mesh.ep),
            "efsdp": (mesh.efsdp, mesh.tp * mesh.fsdp), "dp_replicate": (mesh.dp_replicate, mesh.world)}[group]
    return span[0], span[1] <= per_node


def step_time(plan, mesh: Mesh, by_group: dict, *, batch: int, seq_len: int, checkpointing: bool, gpu: dict,
              per_node: int) -> dict:
    """The ESTIMATE for `mesh` (module docstring): {"compute_s", "comm_s", "step_s", "overlapped_s", "flops",
    "comm": [{"group", "kind", "ranks", "link", "bytes", "seconds"}]}; `by_group` = the slowest rank's
    (mesh dim, kind) -> bytes."""
    flops = step_flops(plan, mesh, batch, seq_len, checkpointing)
    compute = flops / (gpu["bf16_flops"] * gpu["mfu"])
    comm = []
    for (group, kind), nbytes in sorted(by_group.items()):
        ranks, inside = group_size_and_link(mesh, group, per_node)
        if ranks < 2 or not nbytes:
            continue
        bw = gpu["intra_bytes_per_s"] if inside else gpu["inter_bytes_per_s"]
        seconds = _RING[kind] * (ranks - 1) / ranks * nbytes / bw
        comm.append({"group": group, "kind": kind, "ranks": ranks,
                     "link": gpu["intra_link"] if inside else gpu["inter_link"], "bytes": nbytes, "seconds": seconds})
    comm_s = sum(c["seconds"] for c in comm)
    return {"flops": flops, "compute_s": compute, "comm_s": comm_s, "step_s": compute + comm_s,
            "overlapped_s": max(compute, comm_s), "comm": comm}


def assumptions(gpu: dict, per_node: int, gpu_named: bool) -> list[str]:
    return [
        f"GPU {gpu['name']}" + ("" if gpu_named else " (default; --gpu NAME to change)")
        + f": {gpu['bf16_flops'] / 1e12:g} TFLOP/s bf16 dense peak x mfu {gpu['mfu']:g}",
        f"inside a node ({per_node} GPUs): {gpu['intra_link']} {gpu['intra_bytes_per_s'] / 1e9:g} GB/s per GPU and "
        f"direction; between nodes: {gpu['inter_link']} {gpu['inter_bytes_per_s'] / 1e9:g} GB/s per GPU",
        "ring collectives, no compute/communication overlap, no latency or kernel-launch terms: an ESTIMATE",
        FORMULA,
    ]


def _label(m: dict) -> str:
    return " x ".join(f"{k}={m[k]}" for k in ("tp", "fsdp", "dp_replicate", "ep") if m[k] > 1) or "one GPU"


def rank_by_time(plan, fit: dict, *, batch: int, seq_len: int, checkpointing: bool, gpu: dict,
                 gpu_named: bool) -> None:
    """`fit` (tpcli.planning.mesh_fit.fit_meshes) re-ranked: fitting meshes by estimated step time (the slowest
    rank's), each with `step_time` (None where the step model does not cover the mesh: `step_time_unmodelled`
    says why, and those follow the timed ones); `best`, `why` (what makes the winner faster than the runner-up),
    `time_assumptions`. With no mesh timed, the memory ranking stays."""
    from tpcli.planning.step import StepUnmodelled, step_model

    per_node = fit["gpus_per_node"]
    fit["time_assumptions"] = assumptions(gpu, per_node, gpu_named)
    fit["step_time_unmodelled"] = None
    fit["why"] = None
    fitting = [m for m in fit["meshes"] if m["fits"]]
    refused = []
    for m in fitting:
        mesh = Mesh(tp=m["tp"], fsdp=m["fsdp"], dp_replicate=m["dp_replicate"], ep=m["ep"])
        try:
            model = step_model(plan, mesh)
            worst = None
            for t, e in {(c["tp"], c["ep"]) for c in map(mesh.coords, range(mesh.world))}:
                cost = model.rank_cost((t, 0, 0, e), batch, seq_len, checkpointing)
                est = step_time(plan, mesh, cost.by_group, batch=batch, seq_len=seq_len,
                                checkpointing=checkpointing, gpu=gpu, per_node=per_node)
                if worst is None or est["step_s"] > worst["step_s"]:
                    worst = est
        except StepUnmodelled as exc:
            refused.append(str(exc))
            worst = None
        m["step_time"] = worst
    timed = [m for m in fitting if m["step_time"]]
    if refused:  # e.g. TP together with EP: ranked after the timed meshes, by memory
        fit["step_time_unmodelled"] = f"{len(refused)} fitting mesh(es) not timed: {refused[0]}"
    if not timed:
        return
    timed.sort(key=lambda m: (m["step_time"]["step_s"], m["total_bytes"]))
    fit["meshes"] = timed + [m for m in fit["meshes"] if not m.get("step_time")]
    fit["rule"] = ("fitting first; the shortest estimated step time (compute + communication), then the smallest "
                   "total; fitting meshes the step model does not cover after them")
    fit["best"] = timed[0]
    fit["why"] = why(timed[0], timed[1]) if len(timed) > 1 else f"{_label(timed[0])} is the only timed mesh that fits"


def why(best: dict, second: dict) -> str:
    """What makes `best` faster than `second`: the term whose estimate differs most."""
    a, b = best["step_time"], second["step_time"]
    terms = {"compute": (a["compute_s"], b["compute_s"])}
    for side, est in ((0, a), (1, b)):
        for c in est["comm"]:
            key = f"{c['group']} {c['kind']}"
            pair = list(terms.get(key, (0.0, 0.0)))
            pair[side] += c["seconds"]
            terms[key] = tuple(pair)
    term, (x, y) = max(terms.items(), key=lambda kv: kv[1][1] - kv[1][0])
    return (f"{_label(best)} ({a['step_s']:.3g} s: compute {a['compute_s']:.3g} s + communication {a['comm_s']:.3g} s) "
            f"beats {_label(second)} ({b['step_s']:.3g} s) mostly on {term}: {x:.3g} s vs {y:.3g} s (ESTIMATES)")

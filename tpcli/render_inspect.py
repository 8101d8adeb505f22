"""What `inspect` prints: the plan, per-rank shapes and memory, KV cache layers, meshes, the fit over meshes and the
step planner's figures. The console and table helpers are `tpcli.render`'s."""

from __future__ import annotations

from rich import box
from rich.table import Table

from tpcli import render  # render.console looked up at call time (tests and --json swap it)
from tpcli.formats.units import human_bytes
from tpcli.render import identifier_column, mesh_label, print_table, quantization_line, render_findings, shape


def _run_label(first: int, last: int) -> str:
    return f"{first}" if first == last else f"{first}-{last}"


def render_inspect(r: dict) -> None:
    s = r["summary"]
    src = r["source"]
    where = src["hub_id"] + (f"@{src['revision']}" if src.get("revision") else "") if src.get("hub_id") else src["path"]
    render.console.print(f"[bold]{s['architecture']}[/bold] ({s['model_type']}) from {where}")
    render.console.print(f"  parameters {s['parameters']:,}  dtype {s['dtype']}  size {human_bytes(s['total_bytes'])}  "
                  f"plan: {s['plan_source']}")
    if s.get("quantization"):
        q = s["quantization"]
        render.console.print(f"  quantization: {quantization_line(q)}; {q['quantized_tensors']} weights stored as "
                      f"{q['weight_dtype']} with {q['scale_dtype']} scales (sizes are the stored bytes)")
    ck = r.get("checkpoint")
    if ck:
        on_disk = f", {human_bytes(ck['bytes'])}" if ck.get("bytes") else ""
        by_dtype = ", ".join(f"{k} {v:,}" for k, v in ck["parameters_by_dtype"].items())
        extra = sum(ck["parameters_by_dtype"].values()) - s["parameters"]  # the files' elements, not the model's
        why = (f" ({extra:,} more than the model's parameters: tied weights stored under each name, or tensors "
               "that are not parameters)") if extra > 0 else ""
        files = f"{ck['files']} safetensors file{'s' * (ck['files'] != 1)}"
        render.console.print(f"  checkpoint: {files}{on_disk}; elements stored by dtype: {by_dtype}{why}")

    table = Table(title="TP plan", title_justify="left")
    identifier_column(table, "rule", [rule["rule"] for rule in r["plan"]])
    identifier_column(table, "style", [rule["style"] for rule in r["plan"]])
    identifier_column(table, "matches", [rule["matches"] or "0 (matches nothing)" for rule in r["plan"]],
                      justify="right")
    identifier_column(table, "params", [rule["parameters"] for rule in r["plan"]], justify="right")
    identifier_column(table, "bytes sharded", [human_bytes(rule["bytes_sharded"]) for rule in r["plan"]],
                      justify="right")
    for rule in r["plan"]:
        m = str(rule["matches"]) if rule["matches"] else "[red]0 (matches nothing)[/red]"
        table.add_row(rule["rule"], rule["style"], m, str(rule["parameters"]), human_bytes(rule["bytes_sharded"]))
    print_table(table)
    render.console.print("  matches: modules and parameters the rule applies to, all layers; params: parameter tensors it "
                  "places (a tied one counted once); bytes sharded: their bytes split between ranks")

    c = r["coverage"]
    render.console.print(f"Coverage: {c['sharded_fraction'] * 100:.1f}% of parameter bytes sharded, "
                  f"{human_bytes(c['replicated_bytes'])} replicated on every rank")
    if c["largest_replicated"]:
        render.console.print("  largest replicated: " + ", ".join(
            f"{p['name']} {shape(p['shape'])} {human_bytes(p['bytes'])}" for p in c["largest_replicated"][:3]))

    tp = r.get("tp")
    if tp:
        table = Table(title=f"Per-rank shapes at tp={tp['size']}", title_justify="left")
        identifier_column(table, "parameter group", [g["pattern"] for g in tp["groups"]])
        identifier_column(table, "n", [g["count"] for g in tp["groups"]], justify="right")
        identifier_column(table, "placement", [g["placement"] for g in tp["groups"]])
        identifier_column(table, "global", [shape(g["global_shape"]) for g in tp["groups"]])
        widest = max(len(shape(s["shape"])) for g in tp["groups"] for s in g["local_shapes"])  # wraps between shapes
        table.add_column("local per rank", min_width=max(widest, len("local per rank")), overflow="fold")
        for g in tp["groups"]:
            runs = g["local_shapes"]  # [{first, last, shape}]: consecutive ranks with one shape
            if len(runs) == 1:
                local = shape(runs[0]["shape"])
            elif tp["size"] <= 8:
                local = " / ".join(shape(s["shape"]) for s in runs for _ in range(s["first"], s["last"] + 1))
            else:  # large tp: one entry per run of equal shapes
                local = " / ".join(f"{shape(s['shape'])} ranks {_run_label(s['first'], s['last'])}" for s in runs)
            table.add_row(g["pattern"], str(g["count"]), g["placement"], shape(g["global_shape"]), local)
        print_table(table)
        render_rank_memory(tp, r.get("memory"))
        render_findings(tp["findings"], title=f"Checks at tp={tp['size']}")

    render.console.print("Valid TP sizes: " + (", ".join(map(str, r["valid_tp_sizes"])) or "none"))
    invalid = r["invalid_tp_sizes"]
    if invalid:
        shown = list(invalid.items())[:6]
        for k, reason in shown:
            render.console.print(f"  [dim]tp={k}: {reason}[/dim]")
        if len(invalid) > len(shown):
            render.console.print(f"  [dim]... and {len(invalid) - len(shown)} more invalid sizes (see --json)[/dim]")


_MEMORY_COLUMNS = (("weight_bytes", "weights"), ("kv_cache_bytes", "KV cache"), ("grad_bytes", "grads"),
                   ("optimizer_bytes", "AdamW"), ("activation_bytes_estimate", "act. est"))


def _memory_columns(memory: dict | None) -> list[tuple[str, str]]:
    keys = {"weight_bytes"}
    if memory and memory["seq_len"]:
        keys.add("kv_cache_bytes")
    if memory and memory["train"]:
        keys |= {"grad_bytes", "optimizer_bytes"} | ({"activation_bytes_estimate"} if memory["seq_len"] else set())
    return [c for c in _MEMORY_COLUMNS if c[0] in keys]


def _unit(largest: int) -> tuple[str, int]:
    """One unit for a whole table, so that its columns stay narrow enough for 80 columns."""
    for name, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if largest >= size:
            return name, size
    return "B", 1


def _in(n: int, size: int) -> str:
    return f"{n:,}" if size == 1 else f"{n / size:,.2f}"


def _memory_table(title: str, first: str, memory: dict | None) -> tuple[Table, list[tuple[str, str]]]:
    render.console.print(title)  # above the table, not as its title: a narrow table would wrap it
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column(first)
    columns = _memory_columns(memory)
    for _, header in [*columns, ("total_bytes", "total")]:
        table.add_column(header, justify="right")
    return table, columns


def _rank_label(first: int, last: int) -> str:
    return f"rank {first}" if first == last else f"ranks {first}-{last}"


def render_rank_memory(tp: dict, memory: dict | None) -> None:
    """Per-rank memory at one TP size: one row per run of ranks with the same numbers ("ranks 0-6", "rank 7")."""
    unit, size = _unit(max(rk["total_bytes"] for rk in tp["rank_runs"]))
    table, columns = _memory_table(f"Memory per rank at tp={tp['size']}, {unit} ({_memory_what(memory)})", "ranks",
                                   memory)
    keys = [k for k, _ in columns] + ["total_bytes"]
    runs: list[list] = []  # [first, last, values]: runs of the report merged where the shown columns agree
    for rk in tp["rank_runs"]:
        values = tuple(rk[k] for k in keys)
        if runs and runs[-1][2] == values:
            runs[-1][1] = rk["last"]
        else:
            runs.append([rk["first"], rk["last"], values])
    for first, last, values in runs:
        mark = " *" if first <= tp["largest_rank"] <= last and len(runs) > 1 else ""
        table.add_row(_rank_label(first, last) + mark, *(_in(v, size) for v in values))
    print_table(table)
    if len(runs) > 1:
        render.console.print(f"  * largest: rank {tp['largest_rank']}")
    _note_sliding(next(rk for rk in tp["rank_runs"] if rk["first"] <= tp["largest_rank"] <= rk["last"]), memory)


def _memory_what(memory: dict | None) -> str:
    if not memory or not (memory["seq_len"] or memory["train"]):
        return "weights only"
    parts = []
    if memory["seq_len"]:
        parts.append(f"{memory['batch']} x {memory['seq_len']} tokens, KV {memory['kv_dtype']}")
    if memory["train"]:
        parts.append("AdamW training")
    return "; ".join(parts)


def _note_sliding(rank: dict, memory: dict | None) -> None:
    if memory and memory["seq_len"] and rank["kv_cache_visible_bytes"] != rank["kv_cache_bytes"]:
        render.console.print(f"  KV cache: sliding-window layers keep views of the prefill's {memory['seq_len']} tokens; "
                      f"the visible cache is {human_bytes(rank['kv_cache_visible_bytes'])}, the rest is freed at the "
                      "first decode step.")


def render_memory(r: dict) -> None:
    """The largest rank at every valid TP size, and whether it fits the GPU (`--seq-len`, `--train`, `--gpu-mem`)."""
    memory, fit = r.get("memory"), r.get("fit")
    if not memory:
        return
    unit, size = _unit(max((m["total_bytes"] for m in memory["per_tp"].values()), default=0))
    table, columns = _memory_table(f"Largest rank per TP size, {unit} ({_memory_what(memory)})", "tp", memory)
    if fit:
        table.add_column("fits")
    budget = fit["gpu_mem_bytes"] - fit["reserve_bytes"] if fit else None
    for tp, m in memory["per_tp"].items():
        row = [tp, *(_in(m[k], size) for k, _ in columns), _in(m["total_bytes"], size)]
        if fit:
            row.append("[green]yes[/green]" if m["total_bytes"] <= budget else "[red]no[/red]")
        table.add_row(*row)
    print_table(table)
    render_cache_layers(memory)
    if memory["train"]:
        render.console.print("  activations are an estimate (formula in docs/memory-and-meshes.md); the other terms are exact.")
    if not fit:
        return
    gpu = f"a {human_bytes(fit['gpu_mem_bytes'])} GPU ({human_bytes(fit['reserve_bytes'])} reserved)"
    if fit["smallest_fitting_tp"] is not None:
        render.console.print(f"[green]Smallest TP size that fits {gpu}: tp={fit['smallest_fitting_tp']}[/green]")
        return
    advice = fit["advice"]
    if not advice:
        render.console.print(f"[red]No valid TP size fits {gpu}.[/red]")
        return
    render.console.print(f"[red]No valid TP size fits {gpu}:[/red] the best, tp={advice['best_tp']}, misses by "
                  f"{human_bytes(advice['miss_bytes'])} per rank.")
    for change in advice["changes"]:
        if "total_bytes" in change:
            verdict = "fits" if change["fits"] else "still too large"
            render.console.print(f"  {change['text']}: {human_bytes(change['total_bytes'])} per rank, {verdict}")
        else:
            render.console.print(f"  to fit: {change['text']}")


def cache_layer_line(c: dict) -> str:
    """'61 MLA layers: 7.63 GiB replicated on every rank (latent + rope key per token)' for one cache layer kind."""
    per_tp = c["bytes_per_tp"]
    tps = sorted(per_tp, key=int)
    layers = f"{c['layers']} {c['label']} layer{'s' if c['layers'] != 1 else ''}"
    if c["sharded"]:
        first, last = tps[0], tps[-1]
        return f"{layers}: {human_bytes(per_tp[first])} at tp={first} .. {human_bytes(per_tp[last])} at tp={last}, split by TP"
    what = f"{layers}: {human_bytes(per_tp[tps[0]])} replicated on every rank"
    if not c["token_elements"]:
        return f"{what}, fixed size"  # conv / recurrent states: the same at any --seq-len
    if c["states"]:
        return f"{what} (KV + fixed states)"
    return f"{what} ({'latent + rope key' if c['label'] == 'MLA' else 'all KV heads'})"


def render_cache_layers(memory: dict) -> None:
    """One line per kind of cache layer (MLA, attention, gated delta net, mamba, ...) under the memory table."""
    for c in memory.get("cache_layers") or []:
        render.console.print("  " + cache_layer_line(c))


_MESH_DIMS = (("pp", "pp"), ("dp_replicate", "dp_replicate"), ("fsdp", "fsdp"), ("tp", "tp"), ("efsdp", "efsdp"), ("ep", "ep"))


_MESH_ESTIMATES = (("activation_bytes_estimate", "act est"), ("fsdp_gather_bytes_estimate", "gather"))


_MESH_HEADERS = {"kv_cache_bytes": "KV"}  # narrow: the whole table fits 80 columns


def _mesh_unit(largest: int) -> tuple[str, int]:
    """The largest unit in which the largest figure is still >= 10, so that ranks that differ show different."""
    for name, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if largest >= 10 * size:
            return name, size
    return "B", 1


def _rank_list(ranks: list[int]) -> str:
    """[0] -> '0', [0, 1, 2] -> '0-2', [1, 3] -> '1,3', [1, 3, 5, 7, 9] -> '1,3,..,9' (every 2nd)."""
    if len(ranks) == 1:
        return str(ranks[0])
    step = ranks[1] - ranks[0]
    if all(b - a == step for a, b in zip(ranks, ranks[1:], strict=False)):
        if step == 1:
            return f"{ranks[0]}-{ranks[-1]}"
        if len(ranks) > 3:
            return f"{ranks[0]},{ranks[1]},..,{ranks[-1]}"
    return ",".join(map(str, ranks))


def render_mesh(r: dict) -> None:
    """Per-rank memory on a mesh (`inspect --tp T --fsdp F ...`): ranks with equal figures share a row; the
    coordinates column shows what the ranks of a row have in common (`*`: differs within the row)."""
    m = r.get("mesh")
    if not m:
        return
    memory = r.get("memory")
    # efsdp = fsdp x tp / ep places experts; at ep=1 it repeats the (fsdp, tp) coordinates, so only EP shows it
    dims = [(key, name) for key, name in _MESH_DIMS if m.get(key, 1) > 1 and (key != "efsdp" or m["ep"] > 1)]
    columns = [c for c in _memory_columns(memory) if c[0] != "activation_bytes_estimate"]
    columns += [c for c in _MESH_ESTIMATES if any(rk[c[0]] for rk in m["ranks"])]
    keys = [k for k, _ in columns] + ["total_bytes"]
    largest = max(rk["total_bytes"] for rk in m["ranks"])
    unit, size = _mesh_unit(largest)
    render.console.print(f"Memory per rank on the mesh {mesh_label(m)}, in {unit}")
    render.console.print(f"  {_memory_what(memory)}" + ("; coords: (" + ", ".join(n for _, n in dims) + ")" if dims else ""))
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0))
    table.add_column("ranks", no_wrap=True)
    if dims:
        table.add_column("coords", no_wrap=True)
    for key, header in [*columns, ("total_bytes", "total")]:
        table.add_column(_MESH_HEADERS.get(key, header), justify="right", no_wrap=True)
    rows: dict[tuple, list[dict]] = {}
    for rk in m["ranks"]:
        rows.setdefault(tuple(rk[k] for k in keys), []).append(rk)
    for values, members in rows.items():
        coords = []
        for key, _ in dims:
            seen = {rk["coords"][key] for rk in members}
            coords.append(str(seen.pop()) if len(seen) == 1 else "*")
        mark = " *" if values[-1] == largest and len(rows) > 1 else ""
        cells = [_rank_list([rk["rank"] for rk in members]) + mark]
        if dims:
            cells.append("(" + ",".join(coords) + ")")
        table.add_row(*cells, *(f"{v:,}" if size == 1 else f"{v / size:.2f}" for v in values))
    print_table(table)
    if len(rows) > 1:
        render.console.print(f"  * largest: rank {m['largest_rank']}")
    if m.get("stages"):  # transformers' PP: each stage's layers; the stages run one after another
        parts = [f"{s['stage']}: layers {s['layers'][0]}-{s['layers'][1] - 1}" if s["layers"][1] > s["layers"][0]
                 else f"{s['stage']}: no layers" for s in m["stages"]]
        ends = [" + embeddings" * s["embeddings"] + " + head" * s["head"] for s in m["stages"]]
        render.console.print("  stages (run one after another; inference only): "
                      + "; ".join(p + e for p, e in zip(parts, ends, strict=True)))
    estimates = [rk for rk in m["ranks"] if rk["activation_bytes_estimate"] or rk["fsdp_gather_bytes_estimate"]]
    if any(rk["activation_bytes_estimate"] for rk in estimates):
        render.console.print(f"  act est: ESTIMATE of activations at tp={m['tp']}, B per data-parallel rank")
    if any(rk["fsdp_gather_bytes_estimate"] for rk in estimates):
        render.console.print("  gather: ESTIMATE of FSDP's all-gathers: 2 x the largest unit (+1 with --train), held on "
                      "top of the shards, so FSDP can cost a rank more than it saves when one unit (a layer, "
                      "the embedding) is a large share of the model")
    if estimates:
        render.console.print("  (formulas in docs/memory-and-meshes.md); the other terms are exact.")


def render_mesh_fit(r: dict) -> None:
    """`inspect --gpus W --gpu-mem SIZE`: every valid mesh of W GPUs, ranked, its largest rank, and the best."""
    fit = r.get("fit")
    if not fit or "meshes" not in fit:
        return
    meshes = fit["meshes"]
    unit, size = _mesh_unit(max((m["total_bytes"] for m in meshes), default=0))
    node = f", {fit['gpus_per_node']} per node" if fit["gpus_per_node"] != fit["gpus"] else ""
    render.console.print(f"Meshes of {fit['gpus']} GPUs{node}, largest rank in {unit}, budget "
                  f"{human_bytes(fit['gpu_mem_bytes'] - fit['reserve_bytes'])} per GPU")
    render.console.print(f"  ranked: {fit['rule']}")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0))
    pp = any(m.get("pp", 1) > 1 for m in meshes)  # a pp column only when some mesh has pipeline stages
    for col in ("#", *(("pp",) if pp else ()), "tp", "fsdp", "dp_replicate", "ep", "total", "fits"):
        table.add_column(col, justify="left" if col == "fits" else "right", no_wrap=True)
    for i, m in enumerate(meshes, 1):
        table.add_row(str(i), *((str(m.get("pp", 1)),) if pp else ()), str(m["tp"]), str(m["fsdp"]),
                      str(m["dp_replicate"]), str(m["ep"]),
                      f"{m['total_bytes']:,}" if size == 1 else f"{m['total_bytes'] / size:.2f}",
                      "[green]yes[/green]" if m["fits"] else "[red]no[/red]")
    print_table(table)
    if fit["refused_by_model"]:
        render.console.print(f"  {fit['refused_by_model']} more size combinations refused by the model's own rules (no "
                      "EP/FSDP plan, experts not divisible by ep, a shard FSDP would leave empty, EP token "
                      "dispatch with PP).")
    best = fit["best"]
    if best is None:
        render.console.print(f"[red]No mesh of {fit['gpus']} GPUs fits.[/red]")
        return
    stages = f"pp={best['pp']} x " if best.get("pp", 1) > 1 else ""
    render.console.print(f"[green]Best: {stages}tp={best['tp']} x fsdp={best['fsdp']} x dp_replicate={best['dp_replicate']} "
                  f"x ep={best['ep']}[/green]")
    flags, _, script = best["run_flags"].partition("  # ")
    render.console.print(f"  tpcli run {flags} SCRIPT")
    render.console.print(f"  {script}")


def render_step(r: dict) -> None:
    """`inspect --seq-len [--train]`: per rank, what a training step saves for backward and moves per collective,
    and what generate() moves at prefill and per new token (tpcli.planning.step), ranks with equal figures merged."""
    memory = r.get("memory") or {}
    if "step_unmodelled" not in memory:
        return
    if memory["step_unmodelled"]:
        render.console.print(f"No step figures: {memory['step_unmodelled']}")
        return

    def comm(c: dict) -> str:
        return ", ".join(f"{k} {human_bytes(v)}" for k, v in c.items() if v) or "no collectives"

    sources = []
    if r.get("tp"):
        sources.append(("tp=" + str(r["tp"]["size"]), [
            {k: v for k, v in run.items() if k in ("first", "last", "activation_bytes", "comm_bytes",
                                                   "inference_comm_bytes")} for run in r["tp"]["rank_runs"]]))
    if r.get("mesh"):
        rows = [{"rank": x["rank"], **{k: x[k] for k in ("activation_bytes", "comm_bytes", "inference_comm_bytes")
                                       if k in x}} for x in r["mesh"]["ranks"]]
        runs: list = []
        for x in rows:
            figures = {k: v for k, v in x.items() if k != "rank"}
            if runs and {k: v for k, v in runs[-1].items() if k not in ("first", "last")} == figures:
                runs[-1]["last"] = x["rank"]
            else:
                runs.append({"first": x["rank"], "last": x["rank"], **figures})
        sources.append(("mesh", runs))
    render.console.print(f"One step per rank, {memory['batch']} x {memory['seq_len']} tokens (counted from the "
                  "model's modules):")
    for label, runs in sources:
        for run in runs:
            ranks = f"{run['first']}" if run["first"] == run["last"] else f"{run['first']}-{run['last']}"
            lines = []
            if "activation_bytes" in run:
                lines.append(f"training step: saved for backward {human_bytes(run['activation_bytes'])}; "
                             f"{comm(run['comm_bytes'])}")
            inf = run["inference_comm_bytes"]
            lines.append(f"generate: prefill {comm(inf['prefill'])}; per new token {comm(inf['decode_token'])}")
            for text in lines:
                render.console.print(f"  {label} ranks {ranks}: {text}")


def render_step_time(r: dict) -> None:
    """`inspect --gpus W --train --seq-len L`: the fitting meshes' estimated step times, why the best wins, and
    the assumptions (tpcli.planning.steptime)."""
    fit = r.get("fit")
    if not fit or "time_assumptions" not in fit:
        return
    timed = [m for m in fit["meshes"] if m.get("step_time")]
    if fit["step_time_unmodelled"]:
        render.console.print(f"No step-time estimate for some meshes: {fit['step_time_unmodelled']}")
    if not timed:
        return
    render.console.print("Estimated step time per fitting mesh (ESTIMATES, slowest rank):")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, padding=(0, 1, 0, 0))
    for col in ("#", "tp", "fsdp", "dp_replicate", "ep", "step s", "compute s", "comm s"):
        table.add_column(col, justify="right", no_wrap=True)
    for i, m in enumerate(timed, 1):
        t = m["step_time"]
        table.add_row(str(i), str(m["tp"]), str(m["fsdp"]), str(m["dp_replicate"]), str(m["ep"]),
                      f"{t['step_s']:.3g}", f"{t['compute_s']:.3g}", f"{t['comm_s']:.3g}")
    print_table(table)
    for text in ([f"why: {fit['why']}"] if fit["why"] else []) + [f"assumed: {a}" for a in fit["time_assumptions"]]:
        render.console.print(f"  {text}")

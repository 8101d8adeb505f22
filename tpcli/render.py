"""Rich rendering of library results. Nothing here computes; it only draws dicts the library returned.

Names, paths and numbers are never cut: lines are not hard-wrapped (`soft_wrap`: a terminal wraps them visually,
so they copy and grep whole), table cells fold instead of ending in "…", and when the output is not a terminal
(a pipe, a log, CI) there is no width limit at all, whatever COLUMNS says.
"""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

UNLIMITED = 100_000  # columns for non-terminal output: tables take their natural width


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(stderr=stderr, soft_wrap=True, width=None if tty else UNLIMITED)


console = make_console()
err_console = make_console(stderr=True)

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def shape(s) -> str:
    return "(" + ", ".join(map(str, s)) + ")"


def rank_runs(values: list) -> list[tuple[str, object]]:
    """Consecutive ranks with equal values as one entry: [a, a, b] -> [("0-1", a), ("2", b)]."""
    runs: list[list] = []
    for r, v in enumerate(values):
        if runs and runs[-1][2] == v:
            runs[-1][1] = r
        else:
            runs.append([r, r, v])
    return [(f"{a}" if a == b else f"{a}-{b}", v) for a, b, v in runs]


def render_findings(findings: list[dict], title: str = "Findings") -> None:
    if not findings:
        console.print(f"[green]{title}: no problems found[/green]")
        return
    table = Table(title=title, title_justify="left")
    table.add_column("severity", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("message", overflow="fold")
    for f in findings:
        table.add_row(f"[{SEVERITY_STYLE[f['severity']]}]{f['severity']}[/]", f["code"], f["message"])
    console.print(table)


def render_inspect(r: dict) -> None:
    s = r["summary"]
    src = r["source"]
    where = src["hub_id"] + (f"@{src['revision']}" if src.get("revision") else "") if src.get("hub_id") else src["path"]
    console.print(f"[bold]{s['architecture']}[/bold] ({s['model_type']}) from {where}")
    console.print(f"  parameters {s['parameters']:,}  dtype {s['dtype']}  size {human_bytes(s['total_bytes'])}  "
                  f"plan: {s['plan_source']}")
    ck = r.get("checkpoint")
    if ck:
        on_disk = f", {human_bytes(ck['bytes'])}" if ck.get("bytes") else ""
        by_dtype = ", ".join(f"{k} {v:,}" for k, v in ck["parameters_by_dtype"].items())
        console.print(f"  checkpoint: {ck['files']} safetensors file(s){on_disk}; parameters by dtype: {by_dtype}")

    table = Table(title="TP plan", title_justify="left")
    for col in ("rule", "style", "matches", "params", "bytes sharded"):
        numeric = col in ("matches", "params", "bytes sharded")
        table.add_column(col, justify="right" if numeric else "left", no_wrap=numeric, overflow="fold")
    for rule in r["plan"]:
        m = str(rule["matches"]) if rule["matches"] else "[red]0 (matches nothing)[/red]"
        table.add_row(rule["rule"], rule["style"], m, str(rule["parameters"]), human_bytes(rule["bytes_sharded"]))
    console.print(table)

    c = r["coverage"]
    console.print(f"Coverage: {c['sharded_fraction'] * 100:.1f}% of parameter bytes sharded, "
                  f"{human_bytes(c['replicated_bytes'])} replicated on every rank")
    if c["largest_replicated"]:
        console.print("  largest replicated: " + ", ".join(
            f"{p['name']} {shape(p['shape'])} {human_bytes(p['bytes'])}" for p in c["largest_replicated"][:3]))

    tp = r.get("tp")
    if tp:
        table = Table(title=f"Per-rank shapes at tp={tp['size']}", title_justify="left")
        table.add_column("parameter group", overflow="fold")
        table.add_column("n", justify="right", no_wrap=True)
        table.add_column("placement", overflow="fold")
        table.add_column("global", no_wrap=True)
        table.add_column("local per rank", overflow="fold")
        for g in tp["groups"]:
            locals_ = [shape(s) for s in g["local_shapes"]]
            if len(set(locals_)) == 1:
                local = locals_[0]
            elif len(locals_) <= 8:
                local = " / ".join(locals_)
            else:  # large tp: one entry per run of equal shapes
                local = " / ".join(f"{s} ranks {runs}" for runs, s in rank_runs(locals_))
            table.add_row(g["pattern"], str(g["count"]), g["placement"], shape(g["global_shape"]), local)
        console.print(table)
        table = Table(title="Memory per rank (weights only)", title_justify="left")
        for col in ("ranks", "sharded", "replicated", "total"):
            table.add_column(col, justify="right", no_wrap=True)
        layouts = [(rk["sharded_bytes"], rk["replicated_bytes"], rk["total_bytes"]) for rk in tp["ranks"]]
        largest = layouts[tp["largest_rank"]] if layouts else None
        for ranks, (sharded, replicated, total) in rank_runs(layouts):  # one row per run of equal ranks
            mark = " *" if (sharded, replicated, total) == largest else ""
            table.add_row(f"{ranks}{mark}", human_bytes(sharded), human_bytes(replicated), human_bytes(total))
        console.print(table)
        console.print(f"  largest: rank {tp['largest_rank']}")
        render_findings(tp["findings"], title=f"Checks at tp={tp['size']}")

    console.print("Valid TP sizes: " + (", ".join(map(str, r["valid_tp_sizes"])) or "none"))
    invalid = r["invalid_tp_sizes"]
    if invalid:
        shown = list(invalid.items())[:6]
        for k, reason in shown:
            console.print(f"  [dim]tp={k}: {reason}[/dim]")
        if len(invalid) > len(shown):
            console.print(f"  [dim]... and {len(invalid) - len(shown)} more invalid sizes (see --json)[/dim]")


class _NoBar:
    def advance(self, n: int) -> None:
        pass


class _Bar:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)


class progress_bar:  # noqa: N801 - used as a context manager
    """A Rich progress bar in bytes on stderr; does nothing when `enabled` is False."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        self.total, self.description, self.enabled = total, description, enabled
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return _NoBar()
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn(), console=err_console, transient=True)
        self._progress.__enter__()
        return _Bar(self._progress, self._progress.add_task(self.description, total=self.total))

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False


def render_shard(r: dict) -> None:
    console.print(f"[green]Wrote[/green] {r['out']}: tp={r['tp_size']}, {r['tensors']} tensors, "
                  f"{len(r['files'])} rank files, {human_bytes(r['bytes_written'])} in {r['seconds']:.1f} s")
    for name, f in r["files"].items():
        console.print(f"  {name}  {human_bytes(f['bytes'])}  sha256 {f['sha256'][:12]}…")
    if r["unexpected_keys"]:
        console.print(f"[yellow]skipped {len(r['unexpected_keys'])} checkpoint keys the model does not use "
                      f"(e.g. {r['unexpected_keys'][0]})[/yellow]")
    for w in r["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w['message']}")


def render_gather(r: dict) -> None:
    console.print(f"[green]Wrote[/green] {r['out']}: {r['tensors']} tensors from a tp={r['tp_size']} "
                  f"{r['source_kind']} folder, {len(r['files'])} file(s), {human_bytes(r['bytes_written'])} "
                  f"in {r['seconds']:.1f} s")


def render_verify(r: dict) -> None:
    verdict = "[green]OK[/green]" if r["ok"] else "[bold red]FAILED[/bold red]"
    if r["mode"] == "integrity":
        if r["tp"] is None:  # the check stopped at the first error: only that is known
            console.print(f"{r['target']}: sharded folder: {verdict}")
        else:
            console.print(f"{r['target']}: sharded folder, tp={r['tp']}, {r['tensors']} tensors, "
                          f"hashes {'checked' if r['hashes_checked'] else 'not checked'}: {verdict}")
        render_findings(r["findings"], title="Integrity")
        return
    console.print(f"{r['architecture']} at tp={r['tp']} (plan: {r['plan_source']}): {verdict}")
    render_findings(r["findings"], title="Static checks")
    n = r.get("numerics")
    if not n:
        return
    if "skipped" in n or "error" in n:
        console.print(f"[yellow]numerics: {n.get('skipped') or n.get('error')}[/yellow]")
        return
    table = Table(title=f"Numerics: tp={n['world_size']} vs single process ({n['dtype']}, tolerance {n['tolerance']:g})",
                  title_justify="left")
    for col in ("output", "max abs err", "max rel err", ""):
        table.add_column(col, justify="right" if "err" in col else "left")
    for row in [*n["layers"], {"name": "logits", **n["logits"]}]:
        bad = row["max_abs"] > n["tolerance"]
        table.add_row(row["name"], f"{row['max_abs']:.3g}", f"{row['max_rel']:.3g}", "[red]X[/red]" if bad else "")
    console.print(table)
    if n.get("generate_error"):
        console.print(f"[red]greedy decoding with the TP model failed: {n['generate_error']}[/red]")
    console.print(f"greedy tokens {'equal' if n['tokens_equal'] else '[red]differ[/red]'}" +
                  (f"; first divergence at {n['first_bad']}" if n["first_bad"] else ""))

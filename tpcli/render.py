"""Rich rendering of library results. Nothing here computes; it only draws dicts the library returned.

Names, paths and numbers are never cut: nothing ends in "…". When the output is not a terminal (a pipe, a log, CI)
there is no width limit at all, whatever COLUMNS says: tables take their natural width and no line is wrapped. In
a terminal, tables fit its width (cells fold at the joints of names, `fit_width.fit_table`) and prose lines wrap
between words (`fit_width.FittingConsole`).
"""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

from tpcli.fit_width import FittingConsole, fit_table
from tpcli.formats.units import human_bytes

UNLIMITED = 100_000  # columns for non-terminal output: tables take their natural width


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    cls = Console if stderr else FittingConsole  # stdout: prose wraps between words in a terminal
    return cls(stderr=stderr, soft_wrap=True, width=None if tty else UNLIMITED)


console = make_console()
err_console = make_console(stderr=True)

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def shape(s) -> str:
    return "(" + ", ".join(map(str, s)) + ")"


def identifier_column(table: Table, header: str, values, **kwargs) -> None:
    """A column of identifiers (rules, styles, parameter names): as wide as its longest value, so that in a pipe
    each one stays on one line; in a narrow terminal `print_table` folds it at the joints of the names."""
    width = max([len(header), *(len(str(v)) for v in values)])
    table.add_column(header, no_wrap=True, min_width=width, overflow="fold", **kwargs)


def print_table(table: Table) -> None:
    """Print a table within the console's width (`fit_width.fit_table`: no effect in a pipe, whose width is
    unlimited), folding cells rather than letting the terminal split rows or Rich cut a name with "…"."""
    console.print(fit_table(table, console.width))


def render_findings(findings: list[dict], title: str = "Findings") -> None:
    if not findings:
        console.print(f"[green]{title}: no problems found[/green]")
        return
    table = Table(title=title, title_justify="left")
    identifier_column(table, "severity", [f["severity"] for f in findings])
    identifier_column(table, "check", [f["code"] for f in findings])
    table.add_column("message", overflow="fold")
    for f in findings:
        table.add_row(f"[{SEVERITY_STYLE[f['severity']]}]{f['severity']}[/]", f["code"], f["message"])
    print_table(table)


# Memory columns: (report key, header); the KV and training columns appear only when asked for.


# Mesh coordinates shown per row, in the order of transformers' meshes; only dims of size > 1 appear.


def mesh_label(m: dict) -> str:
    """'tp=2 x fsdp=2 (4 ranks)': the sizes above 1, in the order of the flags."""
    sizes = [f"{k}={m[k]}" for k in ("pp", "tp", "fsdp", "dp_replicate", "ep") if m.get(k, 1) > 1] or ["tp=1"]
    return " x ".join(sizes) + f" ({m['world']} rank{'s' * (m['world'] > 1)})"


class status_line:  # noqa: N801 - used as a context manager
    """What a command is doing while nothing else shows: one transient spinner line on stderr, in a terminal only
    (never in a pipe, a log or under --json). `with status_line(enabled) as say: say("loading transformers")`;
    `say` is the callback the library gets (`status=`). It is shown at once when the command starts (before torch
    or transformers are imported) and removed when a progress bar starts or the command ends."""

    active: status_line | None = None

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and err_console.is_terminal
        self._status = None

    def __enter__(self):
        if self.enabled:
            self._status = err_console.status("", spinner="dots")
            self._status.start()
            status_line.active = self
        return self

    def __call__(self, text: str) -> None:
        if self._status is not None:
            self._status.update(f"{text}…", spinner="dots")  # a spinner given: drawn now, not at the next tick

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        if status_line.active is self:
            status_line.active = None

    def __exit__(self, *exc):
        self.stop()
        return False


class _NoBar:
    def advance(self, n: int) -> None:
        pass


class _Bar:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)


def _speed_column():
    """Rich's TransferSpeedColumn in binary units ('12.50 MiB/s')."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class SpeedColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("?" if speed is None else f"{human_bytes(speed)}/s", style="progress.data.speed")

    return SpeedColumn()


class progress_bar:  # noqa: N801 - used as a context manager
    """A Rich progress bar in bytes on stderr; does nothing when `enabled` is False."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        self.total, self.description, self.enabled = total, description, enabled
        self._progress = None

    def __enter__(self):
        if not self.enabled or not err_console.is_terminal:  # a pipe or log: no bar, and no empty line it leaves
            return _NoBar()
        if status_line.active is not None:  # one live display at a time: the bar says what happens now
            status_line.active.stop()
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        # binary units (MiB), as the summaries print sizes (human_bytes); Rich's defaults are decimal (MB)
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                                  _speed_column(), TimeRemainingColumn(), console=err_console, transient=True)
        self._progress.__enter__()
        return _Bar(self._progress, self._progress.add_task(self.description, total=self.total))

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False


def _render_removed(r: dict) -> None:
    for path in r.get("removed_temp_folders", []):
        console.print(f"removed a stale temporary folder of an interrupted tpcli run: {path}", soft_wrap=True)


def render_shard(r: dict) -> None:
    _render_removed(r)
    sizes = f"pp={r['pp_size']} (one file per stage)" if r.get("pp_size", 1) > 1 else f"tp={r['tp_size']}"
    console.print(f"[green]Wrote[/green] {r['out']}: {sizes}, {r['tensors']} tensors, "
                  f"{len(r['files'])} rank file{'s' * (len(r['files']) != 1)}, {human_bytes(r['bytes_written'])} in {r['seconds']:.1f} s")
    for name, f in r["files"].items():  # a terminal gets the hash's start; a pipe or log the whole hash
        digest = f"{f['sha256'][:12]}…" if console.is_terminal else f["sha256"]
        console.print(f"  {name}  {human_bytes(f['bytes'])}  sha256 {digest}")
    q = r.get("quantization")
    if q:
        console.print(f"  quantization: {quantization_line(q)}, {q['representation']} "
                      f"({len(q['scales'])} weights with block scales)" if q["representation"] == "stored" else
                      f"  quantization: {quantization_line(q)}, dequantized while sharding")
    if r["unexpected_keys"]:
        console.print(f"[yellow]skipped {len(r['unexpected_keys'])} checkpoint keys the model does not use "
                      "(recorded in tpcli.json as skipped_keys):[/yellow]")
        for key in r["unexpected_keys"]:
            console.print(f"  [yellow]{key}[/yellow]")
    for w in r["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w['message']}")


def quantization_line(q: dict) -> str:
    """`fp8, blocks 128x128` for a quantization dict (inspect summary, shard manifest)."""
    block = f", blocks {q['block_size'][0]}x{q['block_size'][1]}" if q.get("block_size") else ", per-tensor scales"
    return f"{q['method']}{block}"


def render_gather(r: dict) -> None:
    _render_removed(r)
    state = r.get("state")
    saved = r["saved_by"]
    if state:
        source = f"a training state (step {state['step']}, saved on {state['mesh_text']})"
    elif saved["mesh"]:
        source = f"a {saved['description']} {r['source_kind']} folder"
    else:
        source = f"a {r['source_kind']} folder {saved['description']}"
    console.print(f"[green]Wrote[/green] {r['out']}: {r['tensors']} tensors from {source}, {len(r['files'])} "
                  f"file{'s' * (len(r['files']) != 1)}, {human_bytes(r['bytes_written'])} in {r['seconds']:.1f} s")
    if state:
        left = state["optimizer_left_out"]
        console.print(f"  optimizer state left out ({left['files']} files, {human_bytes(left['bytes'])} in "
                      "optimizer/): tpcli.load_state reads it from the state folder")
    if r.get("left_out"):
        console.print(f"  left out (not model weights): {_left_out(r['left_out'])}")


def _left_out(counts: dict) -> str:
    return ", ".join(f"{n} {'non-tensor values' if k == 'values' else k + ' entries'}" for k, n in counts.items())


def _render_state(r: dict, verdict: str) -> None:
    """`tpcli verify STATE`: one line, the optimizer's coverage, the findings."""
    if "step" not in r:  # the check stopped at its first error
        console.print(f"{r['target']}: training state: {verdict}")
    else:
        o = r["optimizer"]
        console.print(f"{r['target']}: training state, step {r['step']}, saved on {r['mesh_text']}, {r['tensors']} "
                      f"tensors, {r['files']} files, hashes {'checked' if r['hashes_checked'] else 'not checked'}: "
                      f"{verdict}")
        console.print(f"  optimizer {o['class']}: {o['tensors']} tensors ({', '.join(o['state_keys']) or 'none'}) "
                      f"for {o['parameters_with_state']} of {o['parameters']} parameters")
    render_findings(r["findings"], title="Training state")


def render_verify(r: dict) -> None:
    verdict = "[green]OK[/green]" if r["ok"] else "[bold red]FAILED[/bold red]"
    if r["mode"] == "state":
        _render_state(r, verdict)
        return
    if r["mode"] == "train":
        if r["ok"]:
            console.print(f"{r['target']}: training checkpoint ({r['kind']}, {r['ranks']} ranks) of {r['architecture']}: "
                          f"{r['tensors']} tensors in {r['chunks']} chunks, each element covered once, CRC-32 of the records "
                          f"{'checked' if r['records_checked'] else 'not checked'}: {verdict}")
            if r["left_out"]:
                console.print(f"  left out (not model weights): {_left_out(r['left_out'])}")
        else:
            console.print(f"{r['target']}: training checkpoint: {verdict}")
        render_findings(r["findings"], title="Integrity")
        return
    if r["mode"] == "integrity":
        saved = r["saved_by"]
        if saved is None:  # the check stopped at the first error: only that is known
            console.print(f"{r['target']}: sharded folder: {verdict}")
        else:
            what = f", {saved['description']}," if saved["mesh"] else f" {saved['description']},"
            console.print(f"{r['target']}: sharded folder{what} {r['tensors']} tensors, "
                          f"hashes {'checked' if r['hashes_checked'] else 'not checked'}: {verdict}")
        render_findings(r["findings"], title="Integrity")
        return
    where = f"on the mesh {mesh_label(r['mesh'])}" if r.get("mesh") else f"at tp={r['tp']}"
    console.print(f"{r['architecture']} {where} (plan: {r['plan_source']}): {verdict}")
    render_findings(r["findings"], title="Static checks")
    n = r.get("numerics")
    if not n:
        return
    if "skipped" in n or "error" in n:
        console.print(f"[yellow]numerics: {n.get('skipped') or n.get('error')}[/yellow]")
        return
    where = mesh_label(n["mesh"]) if n.get("mesh") else f"tp={n['world_size']}"
    table = Table(title=f"Numerics: {where} vs single process ({n['dtype']}, tolerance {n['tolerance']:g})",
                  title_justify="left")
    for col in ("output", "max abs err", "max rel err", "within tolerance"):
        table.add_column(col, justify="right" if "err" in col else "left", no_wrap=True)
    for row in [*n["layers"], {"name": "logits", **n["logits"]}]:
        bad = row["max_abs"] > n["tolerance"]
        table.add_row(row["name"], f"{row['max_abs']:.3g}", f"{row['max_rel']:.3g}",
                      "[red]no[/red]" if bad else "yes")
    print_table(table)
    if n.get("generate_error"):
        console.print(f"[red]greedy decoding with the TP model failed: {n['generate_error']}[/red]")
    console.print(f"greedy tokens {'equal' if n['tokens_equal'] else '[red]differ[/red]'}" +
                  (f"; first divergence at {n['first_bad']}" if n["first_bad"] else ""))

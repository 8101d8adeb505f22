"""The `tpcli` command line: parse flags, call the library, render. Nothing else lives here.

Importing this module must stay cheap: torch and transformers are imported inside commands only.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from typing import Annotated

import typer

from . import __version__
from .errors import TpcliError, UsageError

app = typer.Typer(
    name="tpcli",
    help="Tensor parallelism for Hugging Face transformers: inspect, verify, shard, run, gather.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Option aliases shared by several commands.
PlanOpt = Annotated[str | None, typer.Option("--plan", help="A shipped plan's NAME (plans/) or a JSON plan FILE, merged over the model's "
                                 "plan. Without it, a model transformers leaves unsharded uses its plans/ entry.")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="Cast while streaming: bf16, fp16 or fp32.")]


def _version(value: bool):
    if value:
        print(f"tpcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Let transformers' own warnings and logs through.")] = False,
):
    """Tensor parallelism for Hugging Face transformers."""
    if not verbose:  # before transformers is imported; workers inherit it. An explicit setting wins.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} must be >= 1 (got {value}).")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # as transformers' convert_file_size_to_int


def _size_bytes(flag: str, text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise UsageError(f"{flag} {text!r}: expected a positive size such as 500MB, 5GB or 2GiB.")
    return int(float(m.group(1)) * _UNITS[unit])


_DURATION = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration_s(flag: str, text: str | None) -> float | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"{flag} {text!r}: expected a positive duration such as 90s, 30m, 2h or plain seconds.")
    return float(m.group(1)) * _DURATION[m.group(2)]


@app.command()
def inspect(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Local model folder or hub id (org/name).")],
    tp: Annotated[int | None, typer.Option("--tp", help="Show per-rank shapes and memory at this TP size.")] = None,
    plan: PlanOpt = None,
    revision: RevisionOpt = None,
    batch: Annotated[int, typer.Option("--batch", help="Sequences per forward, for the KV cache and activations.")] = 1,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per sequence: adds the KV cache per rank.")] = None,
    kv_dtype: Annotated[str | None, typer.Option("--kv-dtype", help="KV cache dtype if not the model's: bf16, fp16, fp32, fp8.")] = None,
    train: Annotated[bool, typer.Option("--train", help="Add gradients, AdamW state and an activation estimate.")] = False,
    gpu_mem: Annotated[str | None, typer.Option("--gpu-mem", help="Memory of one GPU, e.g. 24GiB or 80GB: which TP sizes fit.")] = None,
    reserve: Annotated[str | None, typer.Option("--reserve", help="Kept free per GPU for CUDA context and allocator slack (default 2GiB).")] = None,
    json_out: JsonOpt = False,
):
    """Show a model's TP plan, per-rank shapes and memory, and the valid TP sizes. Loads no weights."""
    _positive("--tp", tp)
    _positive("--batch", batch)
    _positive("--seq-len", seq_len)
    from . import cache
    from .memory import DEFAULT_RESERVE, MemoryOptions, parse_dtype, parse_size

    if reserve is not None and gpu_mem is None:
        raise UsageError("--reserve only applies with --gpu-mem SIZE.")
    memory = MemoryOptions(batch=batch, seq_len=seq_len, train=train,
                           kv_dtype=parse_dtype(kv_dtype, "--kv-dtype") if kv_dtype else None)
    gpu_bytes = parse_size(gpu_mem, "--gpu-mem") if gpu_mem is not None else None
    reserve_bytes = parse_size(reserve or DEFAULT_RESERVE, "--reserve")
    from .render import print_json, render_inspect, render_memory, status_line

    with status_line(not json_out) as say:
        say("checking the result cache")
        key = cache.key(ctx.info_name, ctx.params)  # a hit skips importing torch/transformers (tpcli/cache.py)
        report = cache.get(key)
        if report is None:
            say("loading transformers")
            from .inspection import inspect_model

            say("building the model (no weights) and resolving its TP plan")
            report = inspect_model(model, tp=tp, plan_file=plan, revision=revision, memory=memory,
                                   gpu_mem=gpu_bytes, reserve=reserve_bytes)
            if not report["tp"] or report["tp"]["valid"]:  # only successful results are kept
                report = cache.put(key, report)
    if json_out:
        print_json(report)
    else:
        render_inspect(report)
        render_memory(report)
    if report["tp"] and not report["tp"]["valid"]:
        raise typer.Exit(1)


@app.command()
def verify(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="Model folder / hub id (static, --numerics) or a sharded folder.")],
    tp: Annotated[int | None, typer.Option("--tp", help="TP size to check (required for a model).")] = None,
    plan: PlanOpt = None,
    revision: RevisionOpt = None,
    numerics: Annotated[bool, typer.Option("--numerics", help="Run TP workers on a fixed batch and compare logits.")] = False,
    tolerance: Annotated[float | None, typer.Option("--tolerance", help="Max abs logit error (default fp32 1e-5, bf16/fp16 5e-2).")] = None,
    gpus: Annotated[bool, typer.Option("--gpus", help="Run --numerics workers on GPUs (default: CPU/gloo).")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Sharded folder: skip sha256 of the files.")] = False,
    json_out: JsonOpt = False,
):
    """Catch a broken TP setup before it costs GPU hours."""
    _positive("--tp", tp)
    from . import cache
    from .render import print_json, render_verify, status_line

    with status_line(not json_out) as say:
        say("checking the result cache")
        key = cache.key(ctx.info_name, ctx.params)  # static checks of a local model only (tpcli/cache.py)
        result = cache.get(key)
        if result is None:
            say("loading transformers")
            from . import verification

            result = verification.verify(target, tp=tp, plan_file=plan, revision=revision, numerics=numerics,
                                         tolerance=tolerance, gpus=gpus, quick=quick, progress=not json_out,
                                         status=say)
            if result["ok"]:
                result = cache.put(key, result)
    print_json(result) if json_out else render_verify(result)
    if not result["ok"]:
        raise typer.Exit(1)


@app.command()
def shard(
    model: Annotated[str, typer.Argument(help="Model folder, hub id, or a tpcli/DCP sharded folder (reshard).")],
    tp: Annotated[int, typer.Option("--tp", help="Number of ranks to split into.")],
    out: Annotated[str, typer.Option("--out", help="Output folder (written atomically).")],
    plan: PlanOpt = None,
    dtype: DtypeOpt = None,
    revision: RevisionOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
):
    """Pre-split a checkpoint into per-rank safetensors (transformers' DCP layout + tpcli.json manifest)."""
    _positive("--tp", tp)
    from .render import print_json, render_shard, status_line

    with status_line(not json_out) as say:
        say("loading transformers")
        from .sharding import shard_checkpoint

        say(f"reading {model} and planning the split into {tp} ranks")
        result = shard_checkpoint(model, tp=tp, out=out, plan_file=plan, dtype=dtype, revision=revision,
                                  force=force, progress=not json_out)
    print_json(result) if json_out else render_shard(result)


@app.command()
def gather(
    directory: Annotated[str, typer.Argument(help="A tpcli or transformers DCP sharded folder.")],
    out: Annotated[str, typer.Option("--out", help="Output folder for the merged checkpoint.")],
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output file, e.g. 5GB.")] = "5GB",
    dtype: DtypeOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
):
    """Merge per-rank shards into a standard checkpoint that from_pretrained loads without TP."""
    size = _size_bytes("--max-shard-size", max_shard_size)
    from .render import print_json, render_gather, status_line

    with status_line(not json_out) as say:
        say("loading transformers")
        from .gathering import gather_checkpoint

        say(f"checking {directory} and planning the merge")
        result = gather_checkpoint(directory, out=out, max_shard_size=size, dtype=dtype, force=force,
                                   progress=not json_out)
    print_json(result) if json_out else render_gather(result)


# Everything after SCRIPT belongs to the script (as with python and torchrun): option parsing stops at the first
# positional argument; `main` inserts "--" after `-m MODULE` for the same effect.
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "allow_interspersed_args": False})
def run(
    ctx: typer.Context,
    script: Annotated[str | None, typer.Argument(help="Python script (or use -m MODULE), then its arguments.")] = None,
    gpus: Annotated[int | None, typer.Option("--gpus", help="Workers on this many CUDA GPUs (nccl).")] = None,
    cpu: Annotated[int | None, typer.Option("--cpu", help="Workers on CPU (gloo), GPUs hidden.")] = None,
    module: Annotated[str | None, typer.Option("-m", "--module", help="Run a module instead of a script.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model or sharded folder: preflight it, export TPCLI_MODEL.")] = None,
    plan: PlanOpt = None,
    nnodes: Annotated[int, typer.Option("--nnodes", help="Number of nodes.")] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", help="This node's rank.")] = 0,
    rdzv_endpoint: Annotated[str | None, typer.Option("--rdzv-endpoint", help="HOST:PORT of the rendezvous (multi-node).")] = None,
    rdzv_id: Annotated[str, typer.Option("--rdzv-id", help="Rendezvous id shared by all nodes.")] = "tpcli",
    max_restarts: Annotated[int, typer.Option("--max-restarts", help="torchrun restarts on failure.")] = 0,
    log_dir: Annotated[str | None, typer.Option("--log-dir", help="Keep per-rank logs and error files here.")] = None,
    tee: Annotated[str | None, typer.Option("--tee", help="torchrun --tee: 0 none, 1 stdout, 2 stderr, 3 both.")] = None,
    ranks_filter: Annotated[str | None, typer.Option("--ranks-filter", help="Only show these local ranks, e.g. 0 or 0,1.")] = None,
    skip_preflight: Annotated[bool, typer.Option("--skip-preflight", help="Do not check --model before spawning.")] = False,
    timeout: Annotated[str | None, typer.Option("--timeout", help="Stop every worker after this long (90s, 30m, 2h, "
                                                "or seconds) and exit 124.")] = None,
):
    """Launch torchrun workers (one command), with preflight and clear failure reports.

    Everything after SCRIPT (or -m MODULE) is passed to the script unchanged."""
    from .launch import LaunchSpec, launch

    _check_run_script(ctx, script)
    argv = list(ctx.args)
    if module and script is not None:
        argv.insert(0, script)
        script = None
    if (script is None) == (module is None):
        raise UsageError("give exactly one of SCRIPT.py or -m MODULE.")
    if gpus is not None and cpu is not None:
        raise UsageError("--gpus and --cpu are exclusive; pick one.")
    _positive("--gpus", gpus)
    _positive("--cpu", cpu)
    _positive("--nnodes", nnodes)
    if nnodes > 1 and not rdzv_endpoint:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node).")
    spec = LaunchSpec(
        script=script, module=module, args=argv, gpus=gpus, cpu=cpu if cpu is not None else (None if gpus else 1),
        model=model, plan_file=plan, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
        rdzv_id=rdzv_id, max_restarts=max_restarts, log_dir=log_dir, tee=tee, ranks_filter=ranks_filter,
        preflight=not skip_preflight, timeout_s=_duration_s("--timeout", timeout),
    )
    code = launch(spec, report=lambda line: print(line, file=sys.stderr, flush=True))
    raise typer.Exit(code)


def _check_run_script(ctx: typer.Context, script: str | None) -> None:
    """Option parsing stops at SCRIPT, so a mistyped flag before it (`run --gpu 2 x.py`) arrives as SCRIPT: refuse
    it as the other commands refuse an unknown flag, with the closest option. A missing SCRIPT named like one of
    tpcli's examples (`generate.py`, as README once wrote it) points at `-m tpcli.examples.NAME`."""
    import difflib
    from pathlib import Path

    if script is None or script == "-":
        return
    if script.startswith("-"):
        flag = script.split("=", 1)[0]
        names = [o for p in ctx.command.params for o in getattr(p, "opts", []) if o.startswith("--")]
        close = difflib.get_close_matches(flag, names, n=3, cutoff=0.6)
        maybe = f" (Possible options: {', '.join(close)})" if close else ""
        raise UsageError(f"No such option: {flag}{maybe} (see 'tpcli run --help'; everything after SCRIPT goes "
                         "to the script).")
    if not Path(script).is_file():
        from . import examples

        name = Path(script).stem
        if Path(script).suffix == ".py" and (Path(examples.__file__).parent / f"{name}.py").is_file():
            raise UsageError(f"SCRIPT {script}: no such file; tpcli's example runs as a module: "
                             f"-m tpcli.examples.{name}")


class Interrupted(BaseException):
    """SIGINT/SIGTERM/SIGHUP: unwinds like Ctrl-C (so `storage.atomic_dir` removes its temporary output), but is not
    a KeyboardInterrupt, which typer would turn into a silent exit. Exit code 128 + signal number (130 for Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise Interrupted(signum)


# run's options that take a value (the next argument is not SCRIPT)
_RUN_TAKES_VALUE = {"--gpus", "--cpu", "--model", "--plan", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-id",
                    "--max-restarts", "--log-dir", "--tee", "--ranks-filter", "--timeout", "--revision"}


def _own_args(args: list[str]) -> list[str]:
    """The arguments tpcli parses itself: for `run`, those before SCRIPT, -m MODULE or "--" (the rest is the
    script's)."""
    start = next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))  # after global flags
    if start == len(args) or args[start] != "run":
        return args[:args.index("--")] if "--" in args else args
    i = start + 1
    while i < len(args) and args[i] != "--" and args[i].startswith("-") and args[i] not in ("-m", "--module"):
        i += 2 if args[i] in _RUN_TAKES_VALUE else 1
    return args[:min(i, len(args))]


def _split_run_args(args: list[str]) -> list[str]:
    """`run ... -m MODULE ARGS`: insert "--" after MODULE so that ARGS reach the module untouched."""
    start = next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))  # after global flags
    if start == len(args) or args[start] != "run":
        return args
    takes_value = _RUN_TAKES_VALUE
    i = start + 1
    while i < len(args):
        a = args[i]
        if a == "--" or not a.startswith("-"):
            return args  # SCRIPT (parsing stops there by itself) or an explicit "--"
        if a in ("-m", "--module"):
            return args[:i + 2] + ["--"] + args[i + 2:] if i + 1 < len(args) else args
        if a.startswith(("--module=", "-m")):
            return args[:i + 1] + ["--"] + args[i + 1:]
        i += 2 if a in takes_value else 1
    return args


def _click_exception_types() -> tuple[type, ...]:
    """typer >= 0.29 raises its vendored click's exceptions; older typer raises click's own."""
    types = []
    try:
        from typer._click.exceptions import ClickException as TyperClickException

        types.append(TyperClickException)
    except ImportError:
        pass
    try:
        from click.exceptions import ClickException

        types.append(ClickException)
    except ImportError:
        pass
    return tuple(types)


def _show_usage_error(exc) -> int:
    """One line on stderr: `Error: <what>` plus where to find help; no-arguments shows the help on stdout (exit 2)."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        print(ctx.get_help())
        return 2
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    message = " ".join(exc.format_message().split())
    code = getattr(exc, "exit_code", 2)
    _error_json(message + hint, code, "usage")
    print(f"Error: {message}{hint}", file=sys.stderr)
    return code


def main() -> None:
    """Entry point: run the app, render TpcliError once as a one-line message."""
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        _main()
    finally:  # in-process callers (tests) get their handlers back
        for s, handler in previous.items():
            signal.signal(s, handler)


_JSON_ERRORS = False  # set by `_main` when the command line asks for --json: errors then also go to stdout as JSON


def _error_json(message: str, code: int, kind: str) -> None:
    """Under --json an error is also one JSON object on stdout, so a program reading stdout always gets JSON:
    {"error": the message (as on stderr, without "Error: "), "exit_code", "kind": usage, error class, interrupted}."""
    if _JSON_ERRORS:
        import json

        print(json.dumps({"error": message, "exit_code": code, "kind": kind}), flush=True)


def _main() -> None:
    global _JSON_ERRORS
    from . import versions

    _JSON_ERRORS = "--json" in _own_args(sys.argv[1:])

    note = versions.warning() if len(sys.argv) > 1 and sys.argv[1] not in ("-h", "--help", "--version") else None
    if note:
        print(note, file=sys.stderr)
    try:
        rc = app(args=_split_run_args(sys.argv[1:]), prog_name="tpcli", standalone_mode=False)
    except TpcliError as exc:
        _fail(str(exc), exc.exit_code, "usage" if isinstance(exc, UsageError) else type(exc).__name__)
    except Interrupted as exc:
        _fail(f"interrupted ({signal.Signals(exc.signum).name})", 128 + exc.signum, "interrupted")
    except KeyboardInterrupt:
        _fail("interrupted", 130, "interrupted")
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _fail("aborted", 1, "interrupted")
    except BrokenPipeError:
        _quiet_stdout()  # `tpcli inspect ... | head`: the reader has what it wanted
        sys.exit(0)
    except SystemExit as exc:  # typer turns a BrokenPipeError into sys.exit(1); for a pipe reader that is success
        if isinstance(exc.__context__, BrokenPipeError):
            _quiet_stdout()
            sys.exit(0)
        raise
    except Exception as exc:
        if isinstance(exc, _click_exception_types()):
            sys.exit(_show_usage_error(exc))
        moved = versions.moved_internal(exc)
        if moved:
            _fail(moved, 1, "untested-version")
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot raise BrokenPipeError again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _fail(message: str, code: int, kind: str = "error") -> None:
    if os.environ.get("TPCLI_DEBUG"):
        import traceback

        traceback.print_exc()
    _error_json(message, code, kind)
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(code)

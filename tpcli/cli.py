"""The `tpcli` command line: parse flags, call the library, render. Nothing else lives here.

Importing this module must stay cheap: torch and transformers are imported inside commands only.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated

import typer

from tpcli import __version__
from tpcli.cli_options import (
    MAX_BATCH,
    MAX_SEQ_LEN,
    MAX_TP,
    ConfigOpt,
    DpReplicateOpt,
    DtypeOpt,
    EpOpt,
    ForceOpt,
    FsdpOpt,
    JsonOpt,
    PlanOpt,
    PpOpt,
    RevisionOpt,
    SpOpt,
    check_plan_flag,
    check_run_script,
    click_exception_types,
    mesh_flags,
    own_args,
    positive,
    progress_for,
    split_run_args,
)
from tpcli.errors import TpcliError, UsageError
from tpcli.formats.units import parse_dtype, parse_duration, parse_size

app = typer.Typer(
    name="tpcli",
    help="Tensor parallelism for Hugging Face transformers: inspect, verify, shard, run, gather.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

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


_INSPECT_FIELDS = ("schema", "source", "summary", "checkpoint", "plan", "unused_rules", "valid_tp_sizes",
                   "invalid_tp_sizes", "coverage", "tp", "memory", "fit")


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
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="With --train: the step figures with transformers' gradient checkpointing.")] = False,
    gpu_mem: Annotated[str | None, typer.Option("--gpu-mem", help="Memory of one GPU, e.g. 24GiB or 80GB (G/GiB = 2^30 "
                                                "bytes, GB = 10^9; a unit is required): which TP sizes fit.")] = None,
    reserve: Annotated[str | None, typer.Option("--reserve", help="Kept free per GPU for CUDA context and allocator slack "
                                                "(default 2GiB; 0 for none).")] = None,
    fsdp: FsdpOpt = None,
    dp_replicate: DpReplicateOpt = None,
    ep: EpOpt = None,
    pp: PpOpt = None,
    sp: SpOpt = False,
    gpus: Annotated[int | None, typer.Option("--gpus", help="With --gpu-mem: every valid mesh of this many GPUs, ranked, and the best.")] = None,
    gpus_per_node: Annotated[int | None, typer.Option("--gpus-per-node", help="GPUs per node for --gpus (default: all on one node); TP stays inside a node.")] = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="With --gpus --train --seq-len: the GPU of the step-time estimate (H100, H200, B200, A100, L40S, RTX4090; default H100).")] = None,
    hardware: Annotated[str | None, typer.Option("--hardware", help="JSON file of GPUs/links merged over tpcli's catalogue (tpcli/planning/hardware.json layout).")] = None,
    mfu: Annotated[float | None, typer.Option("--mfu", help="Fraction of the GPU's bf16 peak reached, for the step-time estimate (default 0.4).")] = None,
    json_out: JsonOpt = False,
):
    """Show a model's TP plan, per-rank shapes and memory, and the valid TP sizes. Loads no weights."""
    positive("--tp", tp, MAX_TP)
    positive("--gpus", gpus, MAX_TP)
    positive("--gpus-per-node", gpus_per_node, MAX_TP)
    mesh = mesh_flags(tp, fsdp, dp_replicate, ep, pp)
    if gpus is not None and gpu_mem is None:
        raise UsageError("--gpus W ranks the meshes of W GPUs by memory: add --gpu-mem SIZE (one GPU's memory).")
    if gpus is not None and mesh is not None:
        raise UsageError("--gpus lists every mesh of W GPUs; drop --fsdp/--dp-replicate/--ep/--pp (or drop --gpus).")
    if gpus_per_node is not None and gpus is None:
        raise UsageError("--gpus-per-node only applies with --gpus W.")
    if (gpu or hardware or mfu is not None) and not (gpus is not None and train and seq_len):
        raise UsageError("--gpu/--hardware/--mfu set the step-time estimate: they need --gpus W --train --seq-len L.")
    positive("--batch", batch, MAX_BATCH)
    positive("--seq-len", seq_len, MAX_SEQ_LEN)
    check_plan_flag(plan)
    from tpcli.formats import cache
    from tpcli.planning.memory import DEFAULT_RESERVE, MemoryOptions

    if reserve is not None and gpu_mem is None:
        raise UsageError("--reserve only applies with --gpu-mem SIZE.")
    if gradient_checkpointing and not train:
        raise UsageError("--gradient-checkpointing only applies with --train.")
    memory = MemoryOptions(batch=batch, seq_len=seq_len, train=train, gradient_checkpointing=gradient_checkpointing,
                           kv_dtype=parse_dtype(kv_dtype, "--kv-dtype") if kv_dtype is not None else None)
    gpu_bytes = parse_size(gpu_mem, "--gpu-mem") if gpu_mem is not None else None
    reserve_bytes = parse_size(reserve or DEFAULT_RESERVE, "--reserve", zero=True)
    from tpcli.render import print_json, status_line
    from tpcli.render_inspect import (
        render_inspect,
        render_memory,
        render_mesh,
        render_mesh_fit,
        render_step,
        render_step_time,
    )

    with status_line(not json_out) as say:
        say("checking the result cache")
        key = cache.key(ctx.info_name, ctx.params)  # a hit skips importing torch/transformers (tpcli/formats/cache.py)
        report = cache.get(key, required=_INSPECT_FIELDS)
        if report is None:
            say("loading transformers")
            from tpcli.commands.inspect import inspect_model

            say("building the model (no weights) and resolving its TP plan")
            report = inspect_model(model, tp=tp, plan_file=plan, revision=revision, memory=memory, gpu_mem=gpu_bytes,
                                   reserve=reserve_bytes, mesh=mesh, gpus=gpus, gpus_per_node=gpus_per_node,
                                   timing={"gpu": gpu, "hardware": hardware, "mfu": mfu})
            if not report["tp"] or report["tp"]["valid"]:  # only successful results are kept
                report = cache.put(key, report)
    if json_out:
        print_json(report)
    else:
        render_inspect(report)
        render_memory(report)
        render_mesh(report)
        render_step(report)
        render_mesh_fit(report)
        render_step_time(report)
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
    fsdp: FsdpOpt = None,
    dp_replicate: DpReplicateOpt = None,
    ep: EpOpt = None,
    config: ConfigOpt = None,
    pp: PpOpt = None,
    sp: SpOpt = False,
    json_out: JsonOpt = False,
):
    """Catch a broken TP setup before it costs GPU hours."""
    positive("--tp", tp, MAX_TP)
    check_plan_flag(plan)
    mesh = mesh_flags(tp, fsdp, dp_replicate, ep, pp)
    from tpcli.formats import cache
    from tpcli.render import print_json, render_verify, status_line

    with status_line(not json_out) as say:
        say("checking the result cache")
        key = cache.key(ctx.info_name, ctx.params)  # static checks of a local model only (tpcli/formats/cache.py)
        result = cache.get(key, required=("mode", "target", "architecture", "tp", "plan_source", "findings", "ok"))
        if result is None:
            say("loading transformers")
            from tpcli.commands import verify as verification

            result = verification.verify(target, tp=tp, plan_file=plan, revision=revision, numerics=numerics,
                                         tolerance=tolerance, gpus=gpus, quick=quick, mesh=mesh, status=say,
                                         config=config)
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
    pp: Annotated[int | None, typer.Option("--pp", help="Pipeline stages: pp x tp rank files, each holding only its stage's tensors (its TP chunk of them).")] = None,
    json_out: JsonOpt = False,
):
    """Pre-split a checkpoint into per-rank safetensors (transformers' DCP layout + tpcli.json manifest)."""
    positive("--tp", tp, MAX_TP)
    positive("--pp", pp, MAX_TP)
    check_plan_flag(plan)
    from tpcli.render import print_json, render_shard, status_line

    with status_line(not json_out) as say:
        say("loading transformers")
        from tpcli.commands.shard import shard_checkpoint

        say(f"reading {model} and planning the split into {tp * (pp or 1)} ranks")
        result = shard_checkpoint(model, tp=tp, out=out, plan_file=plan, dtype=dtype, revision=revision,
                                  force=force, progress=progress_for(json_out), pp=pp or 1)
    print_json(result) if json_out else render_shard(result)


@app.command()
def gather(
    directory: Annotated[str, typer.Argument(help="A tpcli or transformers DCP sharded folder, or a training "
                                             "checkpoint (torch DCP, model_world_size_W_rank_R.pt).")],
    out: Annotated[str, typer.Option("--out", help="Output folder for the merged checkpoint.")],
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest output file, e.g. 5GB (GB = 10^9 "
                                                "bytes, G/GiB = 2^30; at least 1 MiB).")] = "5GB",
    dtype: DtypeOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
):
    """Merge per-rank shards into a standard checkpoint that from_pretrained loads without TP."""
    size = parse_size(max_shard_size, "--max-shard-size")
    from tpcli.render import print_json, render_gather, status_line

    with status_line(not json_out) as say:
        say("loading transformers")
        from tpcli.commands.gather import gather_checkpoint

        say(f"checking {directory} and planning the merge")
        result = gather_checkpoint(directory, out=out, max_shard_size=size, dtype=dtype, force=force,
                                   progress=progress_for(json_out), config=config)
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
    tp: Annotated[int | None, typer.Option("--tp", help="Mesh: TP ranks (default: the world left by --fsdp x --dp-replicate).")] = None,
    fsdp: FsdpOpt = None,
    dp_replicate: DpReplicateOpt = None,
    ep: EpOpt = None,
    pp: PpOpt = None,
    sp: SpOpt = False,
    nnodes: Annotated[int | None, typer.Option("--nnodes", help="Number of nodes (default 1; in SLURM: the job's).")] = None,
    node_rank: Annotated[int | None, typer.Option("--node-rank", help="This node's rank (default 0; in SLURM: SLURM_NODEID).")] = None,
    rdzv_endpoint: Annotated[str | None, typer.Option("--rdzv-endpoint", help="HOST:PORT of the rendezvous (multi-node).")] = None,
    rdzv_id: Annotated[str | None, typer.Option("--rdzv-id", help="Rendezvous id shared by all nodes (default tpcli; in SLURM: the job id).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the mesh, the torchrun command and the workers' environment; start nothing.")] = False,
    max_restarts: Annotated[int, typer.Option("--max-restarts", help="torchrun restarts on failure.")] = 0,
    log_dir: Annotated[str | None, typer.Option("--log-dir", help="Keep per-rank logs and error files here, in one run-* subfolder per run.")] = None,
    tee: Annotated[str | None, typer.Option("--tee", help="torchrun --tee: 0 none, 1 stdout, 2 stderr, 3 both.")] = None,
    ranks_filter: Annotated[str | None, typer.Option("--ranks-filter", help="Only show these local ranks, e.g. 0 or 0,1.")] = None,
    skip_preflight: Annotated[bool, typer.Option("--skip-preflight", help="Do not check --model before spawning.")] = False,
    timeout: Annotated[str | None, typer.Option("--timeout", help="Stop every worker after this long (90s, 30m, 2h, "
                                                "or seconds) and exit 124.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="End with one JSON object on stdout (exit code, per-rank "
                                           "exit codes and signals, root cause, log folder, duration); the workers' "
                                           "output then goes to stderr, with tpcli's messages.")] = False,
):
    """Launch torchrun workers (one command), with preflight and clear failure reports.

    Everything after SCRIPT (or -m MODULE) is passed to the script unchanged."""
    from tpcli.commands.launch_spec import LaunchSpec
    from tpcli.commands.run import run_job

    if module is None:  # with -m MODULE, what typer calls SCRIPT is the module's first argument
        check_run_script(ctx, script)
    argv = list(ctx.args)
    if module and script is not None:
        argv.insert(0, script)
        script = None
    if (script is None) == (module is None):
        raise UsageError("give exactly one of SCRIPT.py or -m MODULE.")
    if gpus is not None and cpu is not None:
        raise UsageError("--gpus and --cpu are exclusive; pick one.")
    for flag, value in (("--tp", tp), ("--fsdp", fsdp), ("--dp-replicate", dp_replicate), ("--ep", ep), ("--pp", pp)):
        positive(flag, value, MAX_TP)
    from tpcli.commands import run_checks as checks

    # sizes first, before SLURM's values are read or anything is built from them
    checks.check_count("--gpus", gpus, checks.MAX_NPROC, what="workers per node")
    checks.check_count("--cpu", cpu, checks.MAX_NPROC, what="workers per node")
    checks.check_count("--nnodes", nnodes, checks.MAX_NNODES, what="nodes")
    if node_rank is not None and node_rank < 0:
        raise UsageError(f"--node-rank {node_rank}: must be 0 or more (the first node is 0).")
    names = {"nproc": "--gpus" if gpus else "--cpu", "nnodes": "--nnodes", "node_rank": "--node-rank"}
    slurm = _slurm_nodes()
    if slurm is not None:
        from tpcli.commands import slurm as slurm_flags

        taken: dict[str, str] = {}
        filled, line = slurm_flags.apply(slurm, gpus=gpus, cpu=cpu, nnodes=nnodes, node_rank=node_rank,
                                         rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id, sources=taken)
        print(line, file=sys.stderr, flush=True)
        gpus, nnodes, node_rank, rdzv_endpoint, rdzv_id = (filled[k] for k in (
            "gpus", "nnodes", "node_rank", "rdzv_endpoint", "rdzv_id"))
        names.update({"nproc" if k == "gpus" else k: v for k, v in taken.items()})
    nnodes = 1 if nnodes is None else nnodes
    node_rank = 0 if node_rank is None else node_rank
    rdzv_id = rdzv_id or "tpcli"
    checks.check_sizes(nproc=gpus or cpu or 1, nnodes=nnodes, node_rank=node_rank, names=names)
    if nnodes > 1 and not rdzv_endpoint:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node).")
    spec = LaunchSpec(
        script=script, module=module, args=argv, gpus=gpus, cpu=cpu if cpu is not None else (None if gpus else 1),
        model=model, plan_file=plan, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
        rdzv_id=rdzv_id, max_restarts=max_restarts, log_dir=log_dir, tee=tee, ranks_filter=ranks_filter,
        preflight=not skip_preflight, timeout_s=parse_duration(timeout, "--timeout"), worker_stdout_to_stderr=json_out,
        tp=tp, fsdp=fsdp, dp_replicate=dp_replicate, ep=ep, pp=pp, dry_run=dry_run,
    )
    result = run_job(spec, report=lambda line: print(line, file=sys.stderr, flush=True))
    if json_out:
        from tpcli.render import print_json

        print_json(result.to_json())
    raise typer.Exit(result.exit_code)


def _slurm_nodes():
    """Inside a SLURM allocation (SLURM_JOB_ID set): what SLURM says about the nodes (`tpcli.commands.slurm`)."""
    if not os.environ.get("SLURM_JOB_ID"):
        return None
    from tpcli.commands.slurm import from_env

    return from_env(dict(os.environ))


class Interrupted(BaseException):
    """SIGINT/SIGTERM/SIGHUP: unwinds like Ctrl-C (so `tpcli.formats.output.atomic_dir` removes its temporary output), but is not
    a KeyboardInterrupt, which typer would turn into a silent exit. Exit code 128 + signal number (130 for Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise Interrupted(signum)


# `tpcli --help` lists each command with one line; without short_help click cuts the docstring at 45 characters
# with "...". These are whole sentences, wrapped (never cut) by the help formatter.
SHORT_HELP = {
    "inspect": "Show a model's TP plan, per-rank shapes and memory, and the valid TP sizes (loads no weights).",
    "verify": "Catch a broken TP setup before it costs GPU hours (static checks, --numerics, or a sharded folder).",
    "shard": "Pre-split a checkpoint into per-rank safetensors (transformers' layout + a tpcli.json manifest).",
    "gather": "Merge per-rank shards into a standard checkpoint that from_pretrained loads without TP.",
    "run": "Launch torchrun workers with one command, a preflight and a clear failure report.",
}
for _info in app.registered_commands:
    _info.short_help = SHORT_HELP.get(_info.name or _info.callback.__name__, _info.short_help)


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
    from tpcli import versions

    _JSON_ERRORS = "--json" in own_args(sys.argv[1:])
    if len(sys.argv) > 1 and sys.argv[1] not in ("-h", "--help", "--version"):
        try:
            os.getcwd()
        except OSError:  # every relative path (and the cache key) depends on it
            _fail("the current working directory no longer exists (deleted?); cd to an existing folder and re-run.",
                  2)
    note = versions.warning() if len(sys.argv) > 1 and sys.argv[1] not in ("-h", "--help", "--version") else None
    if note:
        print(note, file=sys.stderr)
    try:
        rc = app(args=split_run_args(sys.argv[1:]), prog_name="tpcli", standalone_mode=False)
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
        if isinstance(exc, click_exception_types()):
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

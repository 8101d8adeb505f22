"""The flags of the `tpcli` command line: option aliases shared by several commands, the bounds and checks of their
values (one line each, UsageError), how `run` tells its own flags from the script's, and which exceptions are click's
usage errors."""

from __future__ import annotations

from typing import Annotated

import typer

from tpcli.errors import UsageError

# Option aliases shared by several commands.
PlanOpt = Annotated[str | None, typer.Option("--plan", help="A shipped plan's NAME (plans/) or a JSON plan FILE, merged over the model's "
                                 "plan. Without it, a model transformers leaves unsharded uses its plans/ entry.")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="Cast while streaming: bf16, fp16 or fp32.")]
ConfigOpt = Annotated[str | None, typer.Option("--config", help="Training checkpoint (DCP, verl .pt): the model folder or hub "
                                               "id it was trained from (default: config.json in DIR or its parent).")]
FsdpOpt = Annotated[int | None, typer.Option("--fsdp", help="Mesh: FSDP2 ranks per replica (world = dp-replicate x fsdp x tp).")]
DpReplicateOpt = Annotated[int | None, typer.Option("--dp-replicate", help="Mesh: replicas of the fsdp x tp group (HSDP).")]
EpOpt = Annotated[int | None, typer.Option("--ep", help="Mesh: expert-parallel ranks (a multiple of --tp dividing fsdp x tp).")]
PpOpt = Annotated[int | None, typer.Option("--pp", help="Mesh: pipeline stages (transformers' PP: layers split across ranks, stages run one after another; inference only).")]


def refuse_sp(value: bool) -> bool:
    """`--sp`: refused in one line while parsing, before anything runs. transformers 5.23 (and 5.24) declares
    `DistributedConfig.enable_sequence_parallel` ("Reserved ... Not wired up yet"): a tp=2 load with it has the same
    parameters, placements, forward hooks, hidden states and logits as without (tests/test_sp.py, measured on CPU
    workers). The registered `sequence_parallel` style is what a plan can use."""
    if value:
        from importlib.metadata import version

        raise UsageError(f"--sp: transformers {version('transformers')} declares DistributedConfig("
                         "enable_sequence_parallel) but does not wire it (a load with it is the load without: same "
                         "placements and logits); drop --sp, or name the 'sequence_parallel' style for the norms in "
                         "a --plan (transformers runs it; logits as one process).")
    return value


SpOpt = Annotated[bool, typer.Option("--sp", callback=refuse_sp, help="Sequence parallel (transformers' enable_sequence_parallel): refused while transformers does not wire it; a --plan may use the 'sequence_parallel' style.")]

MAX_WORLD = 65536  # ranks of one mesh report
MAX_TP = 1024  # no model has attention heads that split further; bounds the per-rank report and the rank files
MAX_SEQ_LEN = 10**9
MAX_BATCH = 10**6


def positive(flag: str, value: int | None, most: int | None = None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} must be >= 1 (got {value}).")
    if value is not None and most is not None and value > most:
        shown = str(value) if len(str(value)) <= 20 else f"a {len(str(value))}-digit number"
        raise UsageError(f"{flag} must be at most {most:,} (got {shown}).")


def check_plan_flag(plan: str | None) -> None:
    """--plan naming a folder, FIFO or device: one line now, before anything reads (or blocks on) it."""
    if plan is not None:
        from tpcli.planning.plans_library import require_plan_file

        require_plan_file(plan, "--plan ")


def mesh_flags(tp: int | None, fsdp: int | None, dp_replicate: int | None, ep: int | None, pp: int | None = None):
    """The mesh flags as a `tpcli.planning.mesh.Mesh`, or None when none is given (plain TP, today's output)."""
    given = {"--fsdp": fsdp, "--dp-replicate": dp_replicate, "--ep": ep, "--pp": pp}
    for flag, value in given.items():
        positive(flag, value, MAX_TP)
    named = [flag for flag, value in given.items() if value is not None]
    if not named:
        return None
    if tp is None:
        raise UsageError(f"{named[0]} describes a mesh around a TP size: add --tp T (--tp 1 for no tensor parallelism).")
    from tpcli.planning.mesh import Mesh, distributed_config

    mesh = Mesh(tp=tp, fsdp=fsdp or 1, dp_replicate=dp_replicate or 1, ep=ep or 1, pp=pp or 1)
    if mesh.world > MAX_WORLD:  # the report lists every rank
        raise UsageError(f"--pp x --tp x --fsdp x --dp-replicate is {mesh.world:,} ranks; at "
                         f"most {MAX_WORLD:,} are planned here.")
    distributed_config(mesh)  # transformers' own size rules, before any model is read
    return mesh


def progress_for(json_out: bool):
    """The progress callback a long command draws with: a bar on stderr, none under --json."""
    from tpcli.commands import no_progress
    from tpcli.render import progress_bar

    return no_progress if json_out else progress_bar


# run's options that take a value (the next argument is not SCRIPT)
RUN_TAKES_VALUE = {"--gpus", "--cpu", "--model", "--plan", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-id",
                    "--max-restarts", "--log-dir", "--tee", "--ranks-filter", "--timeout", "--revision", "--tp", "--fsdp",
                    "--dp-replicate", "--ep", "--pp"}


def own_args(args: list[str]) -> list[str]:
    """The arguments tpcli parses itself: for `run`, those before SCRIPT, -m MODULE or "--" (the rest is the
    script's)."""
    start = next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))  # after global flags
    if start == len(args) or args[start] != "run":
        return args[:args.index("--")] if "--" in args else args
    i = start + 1
    while i < len(args) and args[i] != "--" and args[i].startswith("-") and args[i] not in ("-m", "--module"):
        i += 2 if args[i] in RUN_TAKES_VALUE else 1
    return args[:min(i, len(args))]


def split_run_args(args: list[str]) -> list[str]:
    """`run ... -m MODULE ARGS`: insert "--" after MODULE so that ARGS reach the module untouched."""
    start = next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))  # after global flags
    if start == len(args) or args[start] != "run":
        return args
    takes_value = RUN_TAKES_VALUE
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


def check_run_script(ctx: typer.Context, script: str | None) -> None:
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
        from tpcli import examples

        name = Path(script).stem
        if Path(script).suffix == ".py" and (Path(examples.__file__).parent / f"{name}.py").is_file():
            raise UsageError(f"SCRIPT {script}: no such file; tpcli's example runs as a module: "
                             f"-m tpcli.examples.{name}")


def click_exception_types() -> tuple[type, ...]:
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

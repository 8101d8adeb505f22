"""`tpcli gather` / `tpcli verify` of a training framework's sharded checkpoint (torch DCP, verl's per-rank files).

The folder is opened and checked once (`tpcli.formats.train_folder.TrainFolder`: paths, byte ranges, chunk counts,
coverage); its names are matched to the model that `--config` builds (wrapper prefixes removed, shapes compared);
`lay_out_files` splits the output as `save_pretrained` does, and the byte plan it makes is written by
`tpcli.formats.executor` (the writer of every shard and gather), one reverse-conversion group at a time, into a
temporary folder published once the inputs are proven unchanged. Nothing here writes bytes itself.
"""

from __future__ import annotations

import time
from pathlib import Path

from tpcli.commands import Progress, no_progress
from tpcli.commands.gather import GatherJob, GatherStream, gather_plan, lay_out_files, written_report
from tpcli.errors import CheckpointError, UsageError
from tpcli.formats.executor import execute
from tpcli.formats.output import prepare_output, remove_stale_temps
from tpcli.formats.train_folder import TrainFolder, open_train_folder
from tpcli.formats.units import CAST_DTYPES, parse_dtype

# module wrappers whose names training code leaves in state-dict keys: torch.compile, DDP, FSDP1, activation
# checkpointing (torch.distributed.algorithms._checkpoint), anywhere in the name
WRAPPERS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# DDP / DeepSpeed's top module; "model." of {"model": sd} when .metadata has no planner_data to say so
LEADING = ("module.", "model.")
SHOWN = 3  # names listed in a refusal


def config_folder(folder: Path, config: str | None) -> Path:
    """The model folder whose config.json (and tokenizer) go with `folder`: --config, else the folder or its parent
    (Trainer's `checkpoint-N/` holds config.json next to `pytorch_model_fsdp_0/`)."""
    from tpcli.formats.source import resolve

    if config is not None:
        return resolve(config).path
    for candidate in (folder, folder.parent):
        if (candidate / "config.json").is_file():
            return candidate
    raise UsageError(f"DIR {folder}: a training checkpoint without config.json next to it; pass --config MODEL "
                     "(the model folder or hub id it was trained from).")


def saved_names(tf: TrainFolder, plan) -> dict[str, str]:
    """{run-time name: saved key} for every tensor of the model `plan` describes; a one-line CheckpointError naming
    the first few keys the model does not have, names it has that the folder lacks, or shapes that differ."""
    where = tf.path
    keys: dict[str, str] = {}
    unknown = []
    for key in tf.tensors:
        name = key
        for w in WRAPPERS:
            name = name.replace(w, "")
        for lead in LEADING:
            if name not in plan.tensors and name.removeprefix(lead) in plan.tensors:
                name = name.removeprefix(lead)
        if name in plan.tensors:
            keys[name] = key
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{where}: holds {_first(unknown)}, which {plan.architecture} (the config) does not have; "
                              "pass the --config of the model this checkpoint was trained from.")
    missing = [n for n, t in plan.tensors.items() if not t.tied_to and n not in keys]
    if missing:
        raise CheckpointError(f"{where}: lacks {_first(missing)} of {plan.architecture}; is the checkpoint complete, "
                              "and is --config the model it was trained from?")
    wrong = [f"{n} {list(tf.tensors[k].shape)} (config: {list(plan.tensors[n].shape)})" for n, k in keys.items()
             if tf.tensors[k].shape != plan.tensors[n].shape]
    if wrong:
        raise CheckpointError(f"{where}: shapes differ from the config: {_first(wrong)}; pass the --config of the model "
                              "this checkpoint was trained from.")
    return {n: k for n, k in keys.items() if not plan.tensors[n].tied_to}


def _first(items: list[str]) -> str:
    more = f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


class TrainReader:
    """`GatherStream`'s reader: run-time name -> the whole tensor, assembled from its saved pieces."""

    def __init__(self, tf: TrainFolder, keys: dict[str, str]):
        self.tf, self.keys = tf, keys

    def read(self, group: list[str]) -> dict:
        return {n: self.tf.read_full(self.keys[n]) for n in group}

    def step_bytes(self, group: list[str]) -> int:
        return sum(self.tf.tensors[self.keys[n]].nbytes for n in group)

    def close(self) -> None:
        self.tf.close()


def open_checked(directory: str, config: str | None):
    """(train folder, its config folder, plan, {run-time name: saved key}): everything verified, nothing read."""
    from tpcli.planning.plan import load_config, resolve_plan

    folder = Path(directory).expanduser().resolve()
    tf = open_train_folder(folder)
    if tf is None:
        raise CheckpointError(f"DIR {directory}: neither a DCP checkpoint (.metadata) nor model_world_size_W_rank_R.pt "
                              "files.")
    source = config_folder(folder, config)
    plan = resolve_plan(load_config(source))
    return tf, source, plan, saved_names(tf, plan)


def plan_train_job(tf: TrainFolder, plan, keys: dict[str, str], *, max_shard_size, cast: str | None,
                   aux_folder: Path) -> GatherJob:
    """The byte plan of the merged checkpoint (every tensor streamed: the pieces are assembled, not copied)."""
    from tpcli.formats.units import tensor_bytes
    from tpcli.planning.convert import Conversions

    conv = Conversions(plan.model)
    tensors = {n: (tf.tensors[k].shape, tf.tensors[k].dtype) for n, k in keys.items()}
    files, groups = lay_out_files(tensors, conv, cast=cast, max_shard_size=max_shard_size)
    total = sum(tensor_bytes(dtype, shape) for shape, dtype in tensors.values())
    byte_plan = gather_plan(tf.path, files, parameter_count=plan.parameter_count, total=total, cast=cast,
                            aux_folder=aux_folder)
    return GatherJob(byte_plan, GatherStream(TrainReader(tf, keys), groups, conv, cast,
                                             {t.name: f.name for f in files for t in f.tensors}))


def gather_train(directory: str, *, config: str | None, out: str, max_shard_size="5GB", dtype: str | None = None,
                 force: bool = False, progress: Progress = no_progress) -> dict:
    started = time.perf_counter()
    cast = parse_dtype(dtype, "--dtype", allowed=CAST_DTYPES)
    tf, source, plan, keys = open_checked(directory, config)
    out_path = prepare_output(out, force=force, inputs=[tf.path])
    removed = remove_stale_temps(out_path.parent)
    job = plan_train_job(tf, plan, keys, max_shard_size=max_shard_size, cast=cast, aux_folder=source)
    written = execute(job.plan, out_path, force=force, progress=progress, check_inputs=tf.check_unchanged,
                      stream=job.stream)
    return {
        "out": str(out_path),
        "source": str(tf.path),
        "source_kind": f"torch-{tf.kind}" if tf.kind == "dcp" else tf.kind,
        "state": None,
        "path": "stream",
        "tp_size": None,
        "saved_by": {"mesh": None, "description": f"saved by {tf.world_size} ranks"},
        "config": str(source),
        "left_out": tf.left_out,
        **written_report(job.plan, written, removed, started),
    }


def verify_train(directory: str, *, config: str | None = None, quick: bool = False) -> dict:
    """`tpcli verify DIR` of a training checkpoint: coverage and agreement with the config, and (unless `quick`)
    every record's CRC-32; no tensor is built."""
    from tpcli.planning.checks import Finding

    try:
        tf, source, plan, keys = open_checked(directory, config)
        try:
            if not quick:
                tf.check_records()
        finally:
            tf.close()
    except CheckpointError as exc:
        return {"mode": "train", "target": directory, "ok": False, "saved_by": None,
                "findings": [Finding("error", "integrity", str(exc)).to_dict()]}
    return {"mode": "train", "target": directory, "ok": True, "kind": tf.kind, "config": str(source),
            "architecture": plan.architecture, "tensors": len(keys), "chunks": sum(len(tf.tensors[k].pieces)
                                                                                 for k in keys.values()),
            "ranks": tf.world_size, "left_out": tf.left_out, "records_checked": not quick, "findings": []}

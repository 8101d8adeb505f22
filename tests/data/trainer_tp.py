"""transformers' `Trainer` on a model `tpcli.load_model` sharded for this rank: train, checkpoint, resume.

    tpcli run --cpu 2 --model DIR tests/data/trainer_tp.py --out RUN --probe-refusals --resume-from own
    tpcli run --cpu 4 --tp 2 --fsdp 2 --model DIR tests/data/trainer_tp.py --out RUN --resume-from CKPT
    python tests/data/trainer_tp.py --model DIR --out RUN --full-checkpoints --resume-from own --resume-from CKPT

Trains MAX_STEPS AdamW steps (lr 1e-4 constant, no weight decay) on a fixed dataset of token ids (labels = input
ids), GLOBAL_BATCH sequences per step split over the data-parallel ranks, with a checkpoint every SAVE_STEPS and
`save_only_model=True` (the only save setting transformers 5.23 accepts for a model sharded at load time; the
optimizer too with `--full-checkpoints`); then, for each `--resume-from CKPT`, loads the model again and resumes
with `trainer.train(resume_from_checkpoint=CKPT)` into RUN/resumed-I.

Rank 0 writes RUN/report.json and RUN[/resumed-I]/final.pt (the final weights, gathered full):
  refusals:   with --probe-refusals, the errors Trainer raises for a TP model first: on CPU workers (accelerate) and,
              past that, with the default save settings (transformers)
  losses:     {step: loss averaged over the data-parallel ranks} of the uninterrupted run
  checkpoints: {folder: [files]}
  resumed:    {I: {"from": CKPT, "losses": {...}} or {"from": CKPT, "error": "Type: message"}} (a resume that
              raises is a finding, not a crash)

Under `tpcli run` on CPU, accelerate refuses a TP model (`ParallelismConfig is only compatible
DistributedType.FSDP (version 2) or DistributedType.Multi{Device} ..., but got DistributedType.MULTI_CPU`);
`allow_tp_on_cpu_workers` drops that one check (and nothing else) so that Trainer takes its multi-GPU TP path on
CPU/gloo: the path whose checkpoints and resume this script examines.
"""

import argparse
import json
import os
from pathlib import Path

import torch

import tpcli

GLOBAL_BATCH = 4  # sequences per optimizer step, split over the data-parallel ranks
SEQ_LEN = 8
MAX_STEPS, SAVE_STEPS = 4, 2
CPU_REFUSAL = "ParallelismConfig is only compatible"


def dataset(vocab: int) -> list[dict]:
    """GLOBAL_BATCH x MAX_STEPS fixed sequences of token ids (the same on every rank and every run)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (GLOBAL_BATCH * MAX_STEPS, SEQ_LEN), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def full_state(model) -> dict:
    """Every parameter as a full tensor (DTensors gathered; a collective on every rank)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
    return out


def allow_tp_on_cpu_workers() -> None:
    """Let accelerate take its multi-device TP path on CPU workers: skip only the distributed-type refusal."""
    from accelerate.parallelism_config import ParallelismConfig

    check = ParallelismConfig._validate_accelerator

    def validate(self, accelerator):
        try:
            check(self, accelerator)
        except ValueError as e:
            if not str(e).startswith(CPU_REFUSAL) or accelerator.device.type != "cpu":
                raise

    ParallelismConfig._validate_accelerator = validate


def training_args(out: Path, dp_size: int, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), max_steps=MAX_STEPS, save_steps=SAVE_STEPS, save_strategy="steps", logging_steps=1,
        per_device_train_batch_size=GLOBAL_BATCH // dp_size, learning_rate=1e-4, lr_scheduler_type="constant",
        weight_decay=0.0, report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        disable_tqdm=True, **kw)


def trainer_for(model, args, losses: list):
    """A `Trainer` that appends each step's loss (this rank's) to `losses`."""
    from transformers import Trainer

    class Recording(Trainer):
        def training_step(self, *a, **kw):
            loss = super().training_step(*a, **kw)
            losses.append(loss.detach().clone())
            return loss

    return Recording(model=model, args=args, train_dataset=dataset(model.config.get_text_config().vocab_size))


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def probe_refusals(model, out: Path, dp_size: int) -> dict:
    """The errors Trainer raises for a TP model: on CPU workers, then (past that) with the default save settings."""
    found = {}
    for key in ("cpu", "optimizer"):
        if key == "optimizer":
            allow_tp_on_cpu_workers()
        try:
            trainer_for(model, training_args(out / "probe", dp_size), [])
            found[key] = None
        except ValueError as e:
            found[key] = error_text(e)
    return found


def train(model_path, out: Path, dp_size: int, only_model: bool, resume=None) -> tuple[dict, object]:
    """Train (or resume from `resume`): ({step: loss averaged over the data-parallel ranks}, trained model)."""
    model = tpcli.load_model(model_path)
    losses: list = []
    trainer = trainer_for(model, training_args(out, dp_size, save_only_model=only_model), losses)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    mean = torch.stack(losses).float()
    if torch.distributed.is_initialized():  # TP ranks of a group agree: the world mean is the data-parallel mean
        torch.distributed.all_reduce(mean)
        mean /= torch.distributed.get_world_size()
    first = trainer.state.global_step - len(losses) + 1
    return {first + i: v for i, v in enumerate(mean.tolist())}, trainer.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("TPCLI_MODEL"))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--probe-refusals", action="store_true")
    parser.add_argument("--full-checkpoints", action="store_true",
                        help="save the optimizer too (save_only_model=False; Trainer accepts it only without TP)")
    parser.add_argument("--resume-from", action="append", default=[], metavar="CKPT",
                        help="then resume from CKPT ('own': RUN/checkpoint-2) into RUN/resumed-I; repeatable")
    args = parser.parse_args()

    rank = int(os.environ.get("RANK", 0))
    info = tpcli.mesh_info()
    report: dict = {"mesh": str(info.mesh), "dp_size": info.dp_size}
    if args.probe_refusals:
        report["refusals"] = probe_refusals(tpcli.load_model(args.model), args.out, info.dp_size)
    if info.mesh.world > 1:
        allow_tp_on_cpu_workers()
    only_model = not args.full_checkpoints
    report["losses"], trained = train(args.model, args.out, info.dp_size, only_model)
    weights = full_state(trained)
    if rank == 0:
        torch.save(weights, args.out / "final.pt")
        report["checkpoints"] = {p.name: sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file())
                                 for p in sorted(args.out.glob("checkpoint-*"))}
    report["resumed"] = {}
    for i, ckpt in enumerate(args.resume_from):
        ckpt = args.out / f"checkpoint-{SAVE_STEPS}" if ckpt == "own" else Path(ckpt)
        out = args.out / f"resumed-{i}"
        try:
            losses, resumed = train(args.model, out, info.dp_size, only_model, resume=ckpt)
            weights = full_state(resumed)
            report["resumed"][i] = {"from": str(ckpt), "losses": losses}
            if rank == 0:
                torch.save(weights, out / "final.pt")
        except Exception as e:  # noqa: BLE001 - the error is the finding (raised on every rank, no collective hangs)
            report["resumed"][i] = {"from": str(ckpt), "error": error_text(e)}
    if rank == 0:
        (args.out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

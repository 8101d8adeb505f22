"""Train, save the training state, resume at another mesh: `tpcli.save_state` / `tpcli.load_state`.

    tpcli run --cpu 2 --model DIR -m tpcli.examples.train_resume --steps 4 --save-after 2 --state ckpt
    tpcli run --cpu 4 --tp 2 --fsdp 2 -m tpcli.examples.train_resume --steps 4 --resume ckpt/step-2

AdamW on a fixed global batch of `--batch` sequences per step (seeded by the step), split evenly over the
data-parallel ranks (`tpcli.mesh_info(model)`), so every mesh trains on the same data: a run resumed at another
mesh continues the uninterrupted one. `--save-after S` writes `STATE/step-S` after step S (and `STATE/step-N`
after the last step); `--resume DIR` loads the model and optimizer from DIR and continues from its step. Rank 0
prints `step S loss L` (the global batch's mean loss) per step.
"""

import argparse
import os

import torch

import tpcli


def global_batch(step: int, *, vocab: int, batch: int, seq_len: int) -> torch.Tensor:
    """The token ids of step `step` (all data-parallel ranks together)."""
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, vocab, (batch, seq_len), generator=g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("TPCLI_MODEL"), help="defaults to $TPCLI_MODEL")
    parser.add_argument("--resume", help="a folder tpcli.save_state wrote: continue from it")
    parser.add_argument("--state", help="folder for the saved states (STATE/step-S)")
    parser.add_argument("--save-after", type=int, action="append", default=[], help="save after step S (repeat)")
    parser.add_argument("--steps", type=int, default=4, help="train until this many steps are done")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=4, help="global batch (sequences per step, all ranks)")
    parser.add_argument("--seq-len", type=int, default=8)
    args = parser.parse_args()

    model = tpcli.load_model(args.resume or args.model)
    info = tpcli.mesh_info(model)
    if args.batch % info.dp_size:
        raise SystemExit(f"--batch {args.batch} does not split over {info.dp_size} data-parallel ranks")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    done = tpcli.load_state(args.resume, model, optimizer)["step"] if args.resume else 0
    per = args.batch // info.dp_size
    for step in range(done + 1, args.steps + 1):
        ids = global_batch(step, vocab=model.config.get_text_config().vocab_size, batch=args.batch,
                           seq_len=args.seq_len)[info.dp_rank * per:(info.dp_rank + 1) * per].to(model.device)
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        if torch.distributed.is_initialized():  # TP ranks of a group hold the same loss: the world mean is the
            torch.distributed.all_reduce(mean)  # mean over the data-parallel groups' equal-sized batches
            mean /= torch.distributed.get_world_size()
        if info.rank == 0:
            print(f"step {step} loss {mean.item():.9g}", flush=True)
        if args.state and (step in args.save_after or step == args.steps):
            tpcli.save_state(os.path.join(args.state, f"step-{step}"), model, optimizer, step=step,
                             extra={"lr": args.lr})


if __name__ == "__main__":
    main()

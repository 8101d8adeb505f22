"""A few training steps on a TP x FSDP mesh (FSDP2 shards parameters, gradients and AdamW state).

    tpcli run --gpus 8 --tp 4 --fsdp 2 -m tpcli.examples.train_mesh --model DIR --steps 3
    tpcli run --cpu 4 --tp 2 --fsdp 2 -m tpcli.examples.train_mesh --model DIR

Each data-parallel rank (`tpcli.mesh_info(model).dp_rank`) trains on its own batch (`batch_for`: seeded by step
and dp_rank; the TP ranks of one group share it); FSDP averages the gradients over the data-parallel ranks, so a
step equals one step of a single process on all the batches together. Rank 0 prints, per step, the loss averaged
over the data-parallel ranks: `step S loss L`.
"""

import argparse
import os

import torch

import tpcli


def batch_for(step: int, dp_rank: int, *, vocab: int, batch: int = 2, seq_len: int = 8) -> torch.Tensor:
    """The token ids data-parallel rank `dp_rank` trains on at `step` (the same on every TP rank of its group)."""
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    return torch.randint(0, vocab, (batch, seq_len), generator=g)


def make_optimizer(name: str, params, lr: float):
    """AdamW (FSDP2 shards its state like the parameters) or plain SGD. A single-process run on all the batches
    together matches the mesh to float rounding with SGD; AdamW's first steps (about lr x sign(grad)) amplify
    rounding-level gradient differences on entries whose gradient is near 0, so its losses agree less closely."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("TPCLI_MODEL"), help="defaults to $TPCLI_MODEL")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=8)
    args = parser.parse_args()

    model = tpcli.load_model(args.model)
    info = tpcli.mesh_info(model)
    model.train()
    optimizer = make_optimizer(args.optimizer, model.parameters(), args.lr)
    vocab = model.config.get_text_config().vocab_size
    for step in range(args.steps):
        ids = batch_for(step, info.dp_rank, vocab=vocab, batch=args.batch, seq_len=args.seq_len).to(model.device)
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        if torch.distributed.is_initialized():  # every rank holds its group's loss: average over the world
            torch.distributed.all_reduce(mean)
            mean /= torch.distributed.get_world_size()
        if info.rank == 0:
            print(f"step {step} loss {mean.item():.8f}", flush=True)


if __name__ == "__main__":
    main()

"""Write a model's training checkpoint the ways training frameworks do, from FSDP2 (optionally TP x FSDP) ranks.

    torchrun --nproc-per-node=2 fsdp_save_worker.py MODEL_DIR OUT [--tp 2]

Under OUT:
- pytorch_model_fsdp_0/: accelerate's FSDP2 SHARDED_STATE_DICT save, `dcp.save({"model": get_model_state_dict(m)})`;
- app/: the model and its AdamW state in one DCP checkpoint, `dcp.save({"model": ..., "optimizer": ...})`;
- bare/: `dcp.save(get_model_state_dict(m))`, no top-level key;
- titan/: torchtitan's mix, the model's keys at the top and the optimizer under "optimizer";
- verl/ (FSDP only): verl's per-rank `torch.save(model.state_dict(), "model_world_size_W_rank_R.pt")` of DTensors.
The optimizer takes one step with lr=0 so that its state exists while the weights stay bit-equal to MODEL_DIR's.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

sys.path.insert(0, str(Path(__file__).parent))
from worker_common import end_job  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out", type=Path)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--model-only", action="store_true", help="write pytorch_model_fsdp_0/ and verl/ only, no "
                    "optimizer (benchmarks/bench.py: large models)")
    args = ap.parse_args()
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if args.tp > 1:  # TP x FSDP as transformers builds it: DistributedConfig(tp_size, fsdp_size)
        from transformers.distributed import DistributedConfig

        model = AutoModelForCausalLM.from_pretrained(
            args.model, distributed_config=DistributedConfig(tp_size=args.tp, fsdp_size=world // args.tp))
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    msd = get_model_state_dict(model)
    dcp.save({"model": msd}, checkpoint_id=str(args.out / "pytorch_model_fsdp_0"))
    if not args.model_only:
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)
        model(torch.tensor([[1, 2, 3, 4]])).logits.sum().backward()
        opt.step()
        dcp.save({"model": msd, "optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(args.out / "app"))
        dcp.save(msd, checkpoint_id=str(args.out / "bare"))
        dcp.save({**msd, "optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(args.out / "titan"))
    if args.tp == 1:  # verl saves FSDP-only models; torch.save of this TP x FSDP state dict fails in torch 2.13
        (args.out / "verl").mkdir(parents=True, exist_ok=True)  # ("access the data pointer on an invalid storage")
        torch.save(model.state_dict(), args.out / "verl" / f"model_world_size_{world}_rank_{rank}.pt")
    end_job()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

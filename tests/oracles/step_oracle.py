"""Oracle worker (run under torchrun): what one training step really saves for backward and communicates per rank.

    torchrun --nproc-per-node W step_oracle.py OUT MODEL_DIR --tp T [--fsdp F] [--dp-replicate R] [--ep E]
             [--batch B] [--seq-len L] [--gradient-checkpointing] [--detail]

One `DistributedConfig` per job (transformers builds one device mesh per process). On every rank:
`from_pretrained(dir, distributed_config=DistributedConfig(...))` (MoE experts `experts_implementation="eager"`),
`model.train()`, then one forward + backward of `model(ids, labels=ids).loss` over this rank's B x L seeded tokens,
and counts
  * activation_bytes: what autograd saves for backward (`torch.autograd.graph.saved_tensors_hooks`), each storage
    once (`untyped_storage()`; a DTensor by its local tensor), parameters excluded (any `nn.Parameter` packed, FSDP2's
    unsharded parameters included, and every storage such a parameter lives in);
  * comm_bytes: every op whose name holds `c10d` that runs under a `TorchDispatchMode` (functional collectives,
    DTensor's redistributions, FSDP2's all-gathers and reduce-scatters, EP's all-to-all), whole-buffer bytes:
    all_gather = the gathered output, all_reduce / reduce_scatter / all_to_all = the input.
With --gradient-checkpointing the model runs `gradient_checkpointing_enable()` (transformers' default,
non-reentrant). --generate T measures greedy `generate()` of T new tokens instead: the collectives of each
forward (the prefill, then one per new token) under `forwards`. --detail adds every saved storage and every collective (for debugging). Rank r writes OUT.rank{r}.json.
"""

import argparse
import json
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("model")
parser.add_argument("--tp", type=int, default=1)
parser.add_argument("--fsdp", type=int, default=1)
parser.add_argument("--dp-replicate", type=int, default=1)
parser.add_argument("--ep", type=int, default=1)
parser.add_argument("--batch", type=int, default=2)
parser.add_argument("--seq-len", type=int, default=40)
parser.add_argument("--gradient-checkpointing", action="store_true")
parser.add_argument("--detail", action="store_true")
parser.add_argument("--generate", type=int, default=0, metavar="T",
                    help="instead of a training step: greedy generate() of T new tokens, collectives per forward")
args = parser.parse_args()

dist.init_process_group("gloo", timeout=timedelta(seconds=90))
rank = dist.get_rank()
from cache_walk import local  # noqa: E402  (this script's folder is on sys.path)
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402
from worker_common import end_job  # noqa: E402

KINDS = (("all_gather", "all_gather"), ("allgather", "all_gather"), ("reduce_scatter", "reduce_scatter"),
         ("all_reduce", "all_reduce"), ("allreduce", "all_reduce"), ("all_to_all", "all_to_all"),
         ("alltoall", "all_to_all"))


def _tensors(x):
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _tensors(y)]
    return []


def _bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class Collectives(TorchDispatchMode):
    """Counts the c10d ops that run under it: kind -> bytes (whole buffers, see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.active = True  # generate mode: only the model's forwards (not generate's own 0-d stopping syncs)
        self.bytes = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0, "all_to_all": 0}
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if self.active and "c10d" in name and "wait" not in name and "barrier" not in name:
            kind = next((k for s, k in KINDS if s in name), None)
            if kind is not None:
                ins = _tensors(args[0]) if args else []
                if kind == "all_gather":
                    size = _bytes(_tensors(out)[:1]) if "functional" in name else _bytes(ins)
                    if "functional" not in name and "_base" not in name:  # allgather_(outputs, inputs): outputs
                        size = _bytes(ins)
                    if "_base" in name:  # _allgather_base_(output, input)
                        size = _bytes(ins[:1])
                elif kind == "reduce_scatter" and "_base" in name:  # _reduce_scatter_base_(output, input)
                    size = _bytes(_tensors(args[1]))
                elif kind == "reduce_scatter" and "functional" not in name:  # reduce_scatter_(outputs, inputs)
                    size = _bytes(_tensors(args[1]))
                elif kind == "all_to_all" and "functional" not in name:  # alltoall_(outputs, inputs)
                    size = _bytes(_tensors(args[1]))
                else:
                    size = _bytes(ins)
                self.bytes[kind] += size
                self.calls.append([name, kind, size, [[list(t.shape) for t in _tensors(a)][:3] for a in args[:2]],
                                   [list(t.shape) for t in _tensors(out)][:3]])
        return out


class Saved:
    """saved_tensors_hooks: every storage autograd saves, once; parameters apart."""

    def __init__(self, model):
        self.model = model
        self.storages: dict = {}
        self.param_ptrs: set = set()
        self.detail: list = []

    def pack(self, t):
        # storages are told apart by their StorageImpl (`_cdata`), alive while saved: FSDP2 frees its all-gather
        # buffers after each unit (storage.resize_(0)), so a data_ptr is reused by the next unit's parameters
        x = local(t)
        s = x.untyped_storage()
        # the module's parameters now: under FSDP2, the unsharded parameters it registered for this forward
        self.param_ptrs |= {local(p).untyped_storage()._cdata for p in self.model.parameters()}
        if isinstance(t, torch.nn.Parameter) or isinstance(x, torch.nn.Parameter):
            self.param_ptrs.add(s._cdata)
        elif s._cdata not in self.storages:
            self.storages[s._cdata] = s.nbytes()
            if args.detail:
                self.detail.append([list(x.shape), str(x.dtype), s.nbytes(), str(t.grad_fn)[:40] if t.grad_fn else ""])
        return t

    @staticmethod
    def unpack(t):
        return t

    def total(self) -> int:
        return sum(n for p, n in self.storages.items() if p not in self.param_ptrs)


dc = DistributedConfig(tp_size=args.tp, fsdp_size=args.fsdp, dp_replicate_size=args.dp_replicate, ep_size=args.ep)
model = AutoModelForCausalLM.from_pretrained(args.model, distributed_config=dc, experts_implementation="eager")
if args.gradient_checkpointing:
    model.gradient_checkpointing_enable()
model.train()
vocab = model.config.get_text_config().vocab_size
gen = torch.Generator().manual_seed(rank // args.tp)
ids = torch.randint(3, vocab, (args.batch, args.seq_len), generator=gen)
if args.generate:
    model.eval()
    comm = Collectives()
    per_forward: list = []

    def mark(module, inputs):  # every forward of the model starts a new count
        per_forward.append(dict.fromkeys(comm.bytes, 0))
        comm.active = True

    model.register_forward_pre_hook(mark)

    def finish(module, inputs, output):
        done = per_forward[-1]
        for key, value in comm.bytes.items():
            done[key] = value - sum(f[key] for f in per_forward[:-1])
        comm.active = False

    model.register_forward_hook(finish)
    comm.active = False
    with comm, torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.generate, do_sample=False,
                       min_new_tokens=args.generate)
    out = {"forwards": per_forward, "comm_bytes": comm.bytes}
    if args.detail:
        out["calls"] = comm.calls
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(out, indent=1))
    end_job()
saved = Saved(model)
comm = Collectives()
with comm:
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        loss = model(ids, labels=ids).loss
    forward = dict(comm.bytes)
    (loss.to_local() if hasattr(loss, "to_local") else loss).backward() if not hasattr(loss, "placements") \
        else loss.backward()
out = {"activation_bytes": saved.total(), "comm_bytes": comm.bytes,
       "comm_forward_bytes": forward}
if args.detail:
    out["saved"] = saved.detail
    out["calls"] = comm.calls
Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(out, indent=1))
end_job()

"""Every storage reachable from a cache object, each once: the bytes a cache really keeps alive.

A cache layer may hold views (a sliding window's slice keeps the prefill's whole storage), dicts of states
(linear-attention conv / recurrent states), or lists (MiniMax's `linear_cache`); walking the object graph and
counting `untyped_storage().nbytes()` once per storage counts all of them, whatever the layout.
"""

from __future__ import annotations

import torch


def local(t):
    """A DTensor's local shard (what this rank holds), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(t) -> int:
    """Bytes this rank holds of `t` (its local shard's elements, not its storage)."""
    t = local(t)
    return t.numel() * t.element_size()


def adamw_step_bytes(model) -> tuple[int, int]:
    """One AdamW step on `model` (gradients already there): (bytes of its state tensors this rank holds, count of
    its 0-d step counters)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    state_bytes, steps = 0, 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value) and local(value).dim() == 0:
                steps += 1
            elif torch.is_tensor(value):
                state_bytes += nbytes(value)
    return state_bytes, steps


def reachable_tensors(obj) -> list:
    """The tensors reachable from `obj` through attributes, dicts, lists and tuples (each tensor object once)."""
    seen: set[int] = set()
    found: dict[int, torch.Tensor] = {}
    stack = [obj]
    while stack:
        x = stack.pop()
        if id(x) in seen or x is None or isinstance(x, (str, bytes, int, float, bool, torch.device, torch.dtype)):
            continue
        seen.add(id(x))
        if torch.is_tensor(x):
            found[id(x)] = local(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set)):
            stack.extend(x)
        elif hasattr(x, "__dict__") and not isinstance(x, type) and not callable(x):
            stack.extend(vars(x).values())
    return list(found.values())


def cache_bytes(cache) -> dict:
    """{"storage_bytes": each reachable storage once, "tensor_bytes": numel x element size of each tensor}."""
    tensors = [t for t in reachable_tensors(cache) if t.device.type != "meta"]
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[(s.data_ptr(), s.device)] = s.nbytes()
    return {"storage_bytes": sum(storages.values()),
            "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors})}

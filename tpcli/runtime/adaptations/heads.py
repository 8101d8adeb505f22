"""Helpers shared by the fused-QKV adaptations (falcon, bloom, gpt_bigcode): which heads a rank owns, cutting a
replicated fused projection down to them, and slicing per-head ALiBi biases.

A rank r of a tp-way split of H heads owns heads [r*H/tp, (r+1)*H/tp): the same rows a colwise `Shard(0)` of a
per-head-contiguous fused weight gives it (`torch.chunk` of H*w rows into tp chunks of H/tp*w rows).
"""

from __future__ import annotations


def is_sharded(param) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def keep_rows(linear, rows) -> None:
    """Replace a replicated Linear's weight [out, in] (and bias [out]) by their rows `rows` (a 1-D index).

    Used where the rank's rows of a fused projection are not one contiguous chunk (multi-query: its q heads plus the
    single K/V head that every rank needs), which no DTensor placement can express.
    """
    import torch

    index = torch.as_tensor(rows, dtype=torch.long, device=linear.weight.device)
    linear.weight = torch.nn.Parameter(linear.weight.detach().index_select(0, index).contiguous(),
                                       requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.detach().index_select(0, index).contiguous(),
                                         requires_grad=linear.bias.requires_grad)
    linear.out_features = len(index)


def head_rows(first_head: int, count: int, rows_per_head: int, offset: int = 0) -> list[int]:
    """Rows of heads [first_head, first_head + count) in a block of `rows_per_head` rows per head at `offset`."""
    return list(range(offset + first_head * rows_per_head, offset + (first_head + count) * rows_per_head))


def slice_heads(t, *, batch: int, total_heads: int, first: int, count: int):
    """This rank's heads of a per-head tensor laid out as [batch * H, ...] or [batch, H, ...].

    ALiBi biases are built once per forward for all H heads from slopes m_h = f(h, H); a rank computing heads
    [first, first + count) needs exactly their rows (recomputing slopes from the local head count would give the
    slopes of a different, smaller model).
    """
    if t.shape[0] == batch * total_heads:  # H > 1, so this cannot be the [batch, ...] layout
        return t.view(batch, total_heads, *t.shape[1:])[:, first:first + count].reshape(batch * count, *t.shape[1:])
    if t.dim() >= 2 and t.shape[1] == total_heads:  # [batch, H, q, kv]
        return t[:, first:first + count]
    return t  # broadcast over heads (a plain causal mask [batch, 1, q, kv])

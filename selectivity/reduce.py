"""Sum the selectivity state (sums, counts) of every tracked layer across distributed ranks.

One all_reduce for all layers: the states are packed into one flat float64 buffer, reduced with
SUM, and unpacked in place. float64 holds int64 counts exactly up to 2**53 images.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    """True when a process group of more than one rank is initialized: only then is there anything to reduce."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_states(states: list[tuple[torch.Tensor, torch.Tensor]], group=None) -> None:
    """Replace every ``(sums, counts)`` in ``states`` by its sum over the ranks of ``group``.

    A no-op when torch.distributed is not initialized (single process) or the group has one rank.
    Every rank must pass states of the same shapes in the same order.
    """
    if not is_distributed(group) or not states:
        return
    tensors = [t for pair in states for t in pair]
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"all states must be on one device to be reduced together, got {device} and {t.device}")
        if not t.is_contiguous():
            raise ValueError("states must be contiguous; make them with selectivity.ops.new_state()")
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view(t.shape))  # counts: float64 -> int64 is exact here
        offset += n

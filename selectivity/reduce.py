"""Every rank's batch for the tracker's step, under DDP: one all-gather of the per-image means and labels.

Every rank then adds the whole global batch into its own tracker state, so the ranks' states stay
alike and the per-step SI describes all ranks (B x ΣU float32 values a rank, small beside the
gradients). The labels travel in the same float32 tensor as the means (exact for labels < 2**24).
Ranks may hold different batch sizes: the sizes are gathered first (one small all_gather, which
syncs the host with the device on NCCL) and every batch is padded to the largest.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LABELS_EXACT_BELOW = 2 ** 24  # integers float32 holds exactly


def is_distributed(group=None) -> bool:
    """True when a process group of more than one rank is initialized: only then is there anything to gather."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_gather_batch(means: torch.Tensor, labels: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(means [ΣB, N], labels [R, ΣB])``: every rank's ``means [B, N]`` and ``labels [R, B]``, in rank order.

    The inputs themselves when torch.distributed is not initialized or the group has one rank.
    Every rank must call it with the same N and R.
    """
    if not is_distributed(group):
        return means, labels
    world = dist.get_world_size(group)
    B, N = means.shape
    size = torch.tensor([B], dtype=torch.int64, device=means.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    packed = torch.zeros(max(sizes), N + labels.shape[0], dtype=torch.float32, device=means.device)
    packed[:B, :N] = means
    packed[:B, N:] = labels.t()
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    rows = torch.cat([g[:n] for g, n in zip(gathered, sizes)])
    return rows[:, :N].contiguous(), rows[:, N:].t().to(torch.int64).contiguous()

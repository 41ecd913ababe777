"""One long window scored by several ranks together: context parallel, on torch's ring attention.

`parallel.context_parallel = C` groups C consecutive ranks (rank = dp_rank * C + cp_rank, the layout fine-tuning
uses; consecutive ranks share a node). The ranks of a group score the same candidate: each holds 1/C of every
window, in the load-balanced causal layout (of 2C equal chunks, rank r holds chunks r and 2C-1-r, so every rank
does the same attention work), and runs the layer-by-layer forward (`longrope_cli.layerwise`) on its share.
Only attention mixes positions; there each group of heads goes through torch's ring attention (the kernel behind
`torch.distributed.tensor.experimental.context_parallel`: key / value blocks travel over the group and partial
results merge by log-sum-exp), on the SDPA kernel of the device (flash / memory-efficient on CUDA, flash on
CPU, so the path is tested on CPU with gloo). Each rank's loss covers its own tokens, and one all-reduce gives the
window's. Memory per rank: the weights + (the layer-by-layer activations) / C + one kv head group's keys and
values at full length. Groups score different candidates, as data-parallel ranks do without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from longrope_cli.errors import RecipeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContextGroup:
    """The ranks that share one window: the process group, this rank's place in it, and its size."""

    group: Any
    rank: int
    size: int


def context_group(size: int) -> ContextGroup | None:
    """This rank's group of `size` consecutive ranks (None when `size` is 1). Every rank must call it, in the
    same order: each group is created on all ranks."""
    import torch.distributed as dist

    if size <= 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise RecipeError(f"parallel.context_parallel={size} must divide the number of ranks ({world}); launch "
                          f"with torchrun --nproc-per-node a multiple of {size}")
    mine = None
    for first in range(0, world, size):
        ranks = list(range(first, first + size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = ContextGroup(group, rank - first, size)
    log.info("rank %d: scores each window with ranks %d..%d (context parallel %d)", rank, rank - mine.rank,
             rank - mine.rank + size - 1, size)
    return mine


def check_length(length: int, size: int, what: str = "search.target") -> None:
    """The load-balanced layout cuts a window into 2 x size equal chunks."""
    if size > 1 and length % (2 * size):
        raise RecipeError(f"{what}={length} must be a multiple of 2 x parallel.context_parallel = {2 * size} "
                          "(each rank holds two equal chunks of every window)")


def require_layerwise(model: Any, length: int) -> None:
    """Context parallel runs the layer-by-layer forward: a model it cannot serve is a recipe error."""
    from longrope_cli.layerwise import unsupported

    why = unsupported(model, length)
    if why is not None:
        raise RecipeError(f"parallel.context_parallel needs the layer-by-layer scoring forward, which this model "
                          f"cannot use ({why}); set parallel.context_parallel=1")


def local_positions(length: int, cp: ContextGroup, device: Any = None) -> torch.Tensor:
    """The positions this rank holds of a `length`-token window: chunks r and 2C-1-r of 2C (torch's head-tail
    layout, which its ring attention expects for causal masks)."""
    check_length(length, cp.size, "window length")
    piece = length // (2 * cp.size)
    head, tail = cp.rank * piece, (2 * cp.size - 1 - cp.rank) * piece
    return torch.cat([torch.arange(head, head + piece, device=device), torch.arange(tail, tail + piece, device=device)])


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cp: ContextGroup
                   ) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole window's keys, across the group (q, k, v in the
    head-tail layout of `local_positions`, shape (B, heads, L / C, d))."""
    try:
        from torch.distributed.tensor.experimental._context_parallel._attention import (
            _templated_ring_attention,
        )
    except ImportError:  # a private module: it moved in another torch release
        raise RecipeError(f"context-parallel scoring needs torch's ring attention, which torch {torch.__version__} "
                          "does not have where this version expects it; set parallel.context_parallel=1") from None
    aten = torch.ops.aten
    extra: dict[str, Any] = {}
    if q.device.type == "cpu":
        op = aten._scaled_dot_product_flash_attention_for_cpu
    elif q.dtype in (torch.float16, torch.bfloat16):
        op = aten._scaled_dot_product_flash_attention
    else:
        op, extra = aten._scaled_dot_product_efficient_attention, {"attn_bias": None, "compute_log_sumexp": True}
    out, *_ = _templated_ring_attention(cp.group, 2, op, q, k, v, is_causal=True, scale=scale, **extra)
    return out


@torch.no_grad()
def window_nll(model: Any, input_ids: torch.Tensor, labels: torch.Tensor, cp: ContextGroup, chunk: int = 1024
               ) -> tuple[float, int]:
    """(sum of NLL, scored tokens) of windows (B, L) scored by the group together; every rank of the group
    gets the same numbers. `labels` are already shifted (the next token may live on another rank)."""
    import torch.distributed as dist

    from longrope_cli.layerwise import layerwise_hidden
    from longrope_cli.losses import chunked_nll

    length = input_ids.shape[-1]
    require_layerwise(model, length)
    positions = local_positions(length, cp, input_ids.device)
    hidden = layerwise_hidden(model, input_ids[:, positions], chunk, positions=positions, length=length,
                              attend=partial(ring_attention, cp=cp))
    total, count = chunked_nll(model, hidden, labels[:, positions], chunk=chunk)
    summed = torch.stack([total.double(), count.double()])
    dist.all_reduce(summed, group=cp.group)
    return float(summed[0]), int(summed[1])

"""Context-parallel core attention for the local (plain torch) layer spec: the CPU rehearsal's.

megatron-core's local ``DotProductAttention`` refuses context parallelism; on GPUs Transformer
Engine's attention does CP (ring attention over the CP group). This small stand-in exists
only so CPU ranks can prove everything else the framework does for CP (batch slicing, RoPE per
CP rank, the loss reduced over CP, pipeline shapes of seq/CP, checkpoints): it all-gathers K
and V over the CP group, with autograd, and runs megatron's own ``DotProductAttention`` math
with the causal mask of megatron's load-balanced chunks. It holds the whole sequence's K and
V on every CP rank, so it saves no attention memory: never the GPU path.

Chunk layout (``megatron.core.utils.get_batch_on_this_cp_rank``): the sequence is cut into
``2*cp`` equal chunks and CP rank ``r`` holds chunks ``r`` and ``2*cp-1-r``, in that order.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig


def chunk_positions(local_len: int, cp: int, rank: int, device: torch.device) -> torch.Tensor:
    """Global token positions of CP rank ``rank``'s ``local_len`` tokens (its two chunks)."""
    chunk = local_len // 2
    starts = (rank * chunk, (2 * cp - 1 - rank) * chunk)
    return torch.cat([torch.arange(s, s + chunk, device=device) for s in starts])


def _global_order(cp: int, local_len: int, device: torch.device) -> torch.Tensor:
    """For each global position, its index in the rank-ordered concatenation of all ranks'
    chunks (what ``all_gather`` returns)."""
    gathered = torch.cat([chunk_positions(local_len, cp, r, device) for r in range(cp)])
    return torch.argsort(gathered)


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 into global sequence order; backward sums every rank's gradient
    and keeps this rank's chunks (an all-reduce: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        cp, rank = group.size(), group.rank()
        parts = [torch.empty_like(local) for _ in range(cp)]
        dist.all_gather(parts, local.contiguous(), group=group)
        order = _global_order(cp, local.size(0), local.device)
        ctx.group, ctx.positions = group, chunk_positions(local.size(0), cp, rank, local.device)
        return torch.cat(parts).index_select(0, order)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.index_select(0, ctx.positions), None


class ContextParallelDotProductAttention(DotProductAttention):
    """megatron's local attention over the whole sequence's K and V; queries stay local.

    CPU rehearsal only (module docstring): O(seq) K/V memory per CP rank, no overlap.
    """

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection: Any = None) -> None:
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"context-parallel local attention is causal only, not "
                             f"{attn_mask_type}")
        local = copy.copy(config)  # the parent refuses CP; the gather below is what CP adds
        local.context_parallel_size = 1
        super().__init__(local, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         pg_collection=pg_collection)
        self.cp_group = pg_collection.cp

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], **kwargs: Any) -> torch.Tensor:
        """query, key, value: [s/cp, b, heads, head_dim] of this rank's two chunks."""
        if attention_mask is not None:
            raise ValueError("context-parallel local attention builds its own causal mask")
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        key = _GatherSequence.apply(key, self.cp_group)
        value = _GatherSequence.apply(value, self.cp_group)
        q_pos = chunk_positions(query.size(0), cp, rank, query.device)
        k_pos = torch.arange(key.size(0), device=key.device)
        masked = (k_pos[None, :] > q_pos[:, None])[None, None]  # [1, 1, sq, sk]; True: hidden
        return super().forward(query, key, value, masked, **kwargs)

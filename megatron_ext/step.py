"""One optimizer step through megatron's pipeline schedule, with per-token loss averaging.

The global loss, and whether any rank's gradients hold a NaN or inf, are known on every rank
before the update, so neither is ever applied: the weights stay those of the last good step
whatever ``train.on_nan`` does next. megatron would apply a non-finite gradient under a finite
loss: bf16 runs have no grad scaler to find it, and clipping skips a NaN norm.

Each rank also times its own forward passes (batch fetch included): the straggler measure.
Whole-step times are useless for that, since every rank waits for the slowest in the
gradient all-reduce and ends the step at the same moment.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model, get_batch_on_this_cp_rank

from megatron_ext import parallel


@dataclass(frozen=True)
class StepResult:
    loss: float
    """Mean loss per token over the whole global batch (all micro-batches, DP and CP ranks)."""
    grad_norm: float
    lr: float
    tokens: int
    applied: bool
    """False when the optimizer update was not applied: a non-finite loss or gradient (it would
    poison the weights) or megatron's own skip; the lr schedule then does not advance either."""
    grads_finite: bool = True
    """Every gradient of every rank was finite (checked only under a finite loss)."""
    forward_s: float = 0.0
    """Seconds this rank spent in its own forward passes (fetching the batch included), free of
    the waits for other ranks that even out whole-step times; what straggler detection compares."""
    data_digest: int = 0
    """The global batch's ``data.sample_digest`` sum: which samples the step read, in which places."""


def _loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron's per-token convention: (sum, token count, what to report)."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(per_token_loss.float().reshape(-1) * mask)
    tokens = mask.sum().to(torch.int)
    return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach(), tokens.float()])}


def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module):
    """Only the first and last pipeline stages read the batch; the others take activations.

    Under context parallelism each rank keeps its two load-balanced chunks of the sequence
    (megatron's ``get_batch_on_this_cp_rank``, as Megatron-LM's ``get_batch``): tokens,
    positions, labels and loss mask alike. RoPE slices its own table per CP rank."""
    first = get_attr_wrapped_model(model, "pre_process")
    last = get_attr_wrapped_model(model, "post_process")
    batch = (get_batch_on_this_cp_rank(next(data_iterator), parallel.cp_group())
             if (first or last) else None)
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device) if first else None
    positions = batch["position_ids"].to(device) if first else None
    labels = batch["labels"].to(device) if last else None
    # packed fine-tuning sequences: block-diagonal causal (data.kind=sft, PP=1, local spec)
    mask = batch.get("attention_mask") if batch is not None else None
    output = model(tokens, positions, None if mask is None else mask.to(device), labels=labels)
    return output, partial(_loss, batch["loss_mask"].to(device) if last else None)


class _ForwardClock:
    """Times the forward step function: CUDA events on GPU (read once the step has synced; a
    GPU idle while its host fetches the batch counts too), the wall clock on CPU."""

    def __init__(self, on_gpu: bool) -> None:
        self._on_gpu, self._cpu_s = on_gpu, 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def timed(self, step_func: Callable) -> Callable:
        def run(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module):
            if self._on_gpu:  # megatron passes exactly these two arguments
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                out = step_func(data_iterator, model)
                end.record()
                self._events.append((start, end))
                return out
            began = time.perf_counter()
            out = step_func(data_iterator, model)
            self._cpu_s += time.perf_counter() - began
            return out
        return run

    def seconds(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
        return self._cpu_s + sum(start.elapsed_time(end) for start, end in self._events) / 1000


def _nonfinite_grads(model: list[torch.nn.Module], device: torch.device) -> torch.Tensor:
    """1.0 when this rank's reduced gradient buffers hold a NaN or inf, else 0.0. Their sum is
    non-finite iff an element is (short of a 3e38 overflow, itself no gradient to apply), and
    takes no mask the size of the buffers; megatron's ``check_for_nan_in_grad`` takes a norm."""
    sums = [buffer.grad_data.sum()
            for chunk in model for buffer in chunk.buffers + chunk.expert_parallel_buffers]
    total = torch.stack(sums).sum() if sums else torch.zeros((), device=device)
    return torch.logical_not(torch.isfinite(total)).float()


def _global_outcome(losses: list[dict[str, torch.Tensor]], nonfinite_grads: torch.Tensor,
                    data_digest: int, device: torch.device) -> tuple[float, int, bool, int]:
    """Every rank learns the global batch's loss, its tokens, whether every gradient is finite
    (so every rank acts the same way on a NaN) and its data digest, in one all-reduce. float64:
    the token count and the digest stay exact integers (float32 is exact only to 2**24)."""
    total = torch.zeros(4, dtype=torch.float64, device=device)
    if parallel.reports_loss():
        for item in losses:
            total[:2] += item["lm loss"].to(device)
    total[2] = nonfinite_grads
    total[3] = data_digest
    dist.all_reduce(total)
    tokens = int(total[1].item())
    return ((total[0] / max(tokens, 1)).item(), tokens, total[2].item() == 0,
            int(total[3].item()))


def train_step(model: list[torch.nn.Module], optimizer: MegatronOptimizer,
               scheduler: OptimizerParamScheduler, batches: Iterator[dict[str, torch.Tensor]],
               *, num_microbatches: int, seq_length: int, micro_batch_size: int,
               data_digest: Callable[[], int] = lambda: 0) -> StepResult:
    """``data_digest``: this rank's share of the batch's digest, asked once it was read."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    device = next(model[0].parameters()).device
    clock = _ForwardClock(on_gpu=device.type == "cuda")
    losses = get_forward_backward_func()(
        forward_step_func=clock.timed(forward_step),
        data_iterator=[batches] * len(model), model=model, num_microbatches=num_microbatches,
        seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=False)
    loss, tokens, grads_finite, digest = _global_outcome(
        losses, _nonfinite_grads(model, device), data_digest(), device)
    applied, grad_norm = False, math.nan
    if math.isfinite(loss) and grads_finite:  # every rank decides the same way
        applied, norm, _ = optimizer.step()
        grad_norm = float(norm) if norm is not None else math.nan
    if applied:
        scheduler.step(increment=1)
    return StepResult(loss=loss, grad_norm=grad_norm, lr=optimizer.param_groups[0]["lr"],
                      tokens=tokens, applied=applied, grads_finite=grads_finite,
                      forward_s=clock.seconds(), data_digest=digest)

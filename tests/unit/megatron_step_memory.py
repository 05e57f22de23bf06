"""A spawned CPU rank that runs real training steps and reports its live-bytes peak.

The trainer's own pieces (``build_model``, ``wrap_ddp``, ``build_optimizer``, ``train_step``)
run under ``cpu_mode`` with torch.profiler recording every CPU allocation from before the model
is built, so the allocator's running total is everything the rank holds: weights, gradient
buffers, Adam state, activations and every transient of forward, backward and the optimizer
step. Its maximum is the CPU counterpart of ``torch.cuda.max_memory_allocated()``.
Kept apart from the tests so spawned ranks import only what they need.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from launch.schema import RunConfig


def _batches(cfg: RunConfig, count: int) -> Iterator[dict[str, torch.Tensor]]:
    b, s = cfg.train.micro_batch_size, cfg.train.seq_length
    generator = torch.Generator().manual_seed(0)
    for _ in range(count):
        tokens = torch.randint(0, cfg.model.vocab_size, (b, s), generator=generator)
        yield {"tokens": tokens, "labels": tokens.roll(-1, dims=1),
               "loss_mask": torch.ones(b, s), "position_ids": torch.arange(s).expand(b, s)}


HOST_BYTES = 64
"""Allocations of at most this size are left out: scalars (Adam's step counters and megatron's
RNG-tracker bookkeeping, which a GPU run keeps on the host, the loss and its token count), not
modelled by the predictor."""


def _peak_allocated(prof: torch.profiler.profile) -> int:
    """The largest live total among the profiler's allocation records (this thread's).

    Replayed from the records rather than read from the allocator's running total, which keeps
    a tensor another thread freed (the last reference held by a gloo collective's Work): an
    address allocated again while still live was freed unseen, so its old tensor is dropped.
    Left out: the CPU generator states (``torch.get_rng_state()``, which megatron's checkpoint
    and RNG tracker keep on the host in a GPU run too) and ``HOST_BYTES`` scalars."""
    from torch._C._profiler import _EventType
    host = {torch.get_rng_state().numel()}
    records, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            records.append((node.start_time_ns, fields.total_allocated, fields.ptr, fields.alloc_size))
    live: dict[int, int] = {}
    total = peak = 0
    for _, _, ptr, size in sorted(records):  # the running total orders same-time records
        total -= live.pop(ptr, 0)
        if size > HOST_BYTES and size not in host:
            live[ptr] = size
            total += size
        peak = max(peak, total)
    return peak


def step_peak(rank: int, port: int, cfg: RunConfig, steps: int = 2) -> int:
    """This process as rank ``rank`` of ``cfg``'s layout: build, run ``steps`` optimizer steps,
    return the peak bytes the CPU allocator held (step 2 on: Adam's m and v exist)."""
    from launch.config import derive_layout
    from megatron_ext import parallel
    from megatron_ext.cpu import cpu_mode
    from megatron_ext.env import RunEnv
    from megatron_ext.model import build_model
    from megatron_ext.optim import build_optimizer, wrap_ddp
    from megatron_ext.step import train_step

    layout = derive_layout(cfg)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(layout.world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    t = cfg.train
    micro_batches = t.global_batch_size // (t.micro_batch_size * layout.dp)
    with cpu_mode():
        parallel.init(layout, RunEnv.from_env(), seed=1, timeout_s=120, use_gpu=False)
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                        profile_memory=True) as prof:
                chunks, config = build_model(cfg.model, t, layout, False)
                model = wrap_ddp(chunks, config, cfg)
                optimizer, scheduler = build_optimizer(model, config, cfg)
                batches = _batches(cfg, steps * micro_batches)
                for _ in range(steps):
                    train_step(model, optimizer, scheduler, batches,
                               num_microbatches=micro_batches, seq_length=t.seq_length,
                               micro_batch_size=t.micro_batch_size)
            return _peak_allocated(prof)
        finally:
            parallel.shutdown()

"""A spawned CPU rank that runs real training steps and reports its live-bytes peak.

The trainer's own pieces (``build_model``, ``wrap_ddp``, ``build_optimizer``, ``train_step``)
run under ``cpu_mode`` with torch.profiler recording every CPU allocation from before the model
is built, so the allocator's running total is everything the rank holds: weights, gradient
buffers, Adam state, activations and every transient of forward, backward and the optimizer
step. Its maximum is the CPU counterpart of ``torch.cuda.max_memory_allocated()``.
Kept apart from the tests so spawned ranks import only what they need.
"""
from __future__ import annotations

import gc
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


def _alive_storages() -> set[int]:
    """Addresses of every tensor storage Python can still reach (weights, gradient buffers,
    optimizer state, megatron's persistent buffers): what is really live after the steps."""
    return {obj.untyped_storage().data_ptr() for obj in gc.get_objects()
            if isinstance(obj, torch.Tensor)}


def _peak_bounds(prof: torch.profiler.profile, alive: set[int]) -> tuple[int, int]:
    """(lower, upper) bounds of the live-bytes peak, replayed from the allocation records.

    The records are this thread's only: a tensor whose last reference a gloo worker thread drops
    (held by an async collective's Work) is freed unseen, and the allocator's running total keeps
    it. Such a phantom shows as an allocation never freed that nothing reaches at the end
    (``alive``), or as an address allocated again while still live. The upper bound keeps each
    phantom live until that reuse, or to the end; the lower bound leaves it out: the true peak
    lies between. Without phantoms (one rank) the two are equal. Also left out: the CPU
    generator states (``torch.get_rng_state()``, which megatron's checkpoint and RNG tracker keep
    on the host in a GPU run too) and ``HOST_BYTES`` scalars."""
    from torch._C._profiler import _EventType
    host = {torch.get_rng_state().numel()}
    records, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            records.append((node.start_time_ns, fields.total_allocated, fields.ptr,
                            fields.alloc_size))
    records = [(ptr, size) for _, _, ptr, size in sorted(records)  # total orders same-time ones
               if size < 0 or (size > HOST_BYTES and size not in host)]
    phantoms, live = set(), {}
    for index, (ptr, size) in enumerate(records):
        if ptr in live and size > 0:
            phantoms.add(live[ptr])  # allocated again: its earlier tensor was freed unseen
        live.pop(ptr, None)
        if size > 0:
            live[ptr] = index
    phantoms |= {index for ptr, index in live.items() if ptr not in alive}
    return tuple(_replay(records, skip) for skip in (phantoms, set()))  # type: ignore[return-value]


def _replay(records: list[tuple[int, int]], skip: set[int]) -> int:
    """The largest live total of ``records`` (address, +size or -size), without those ``skip``
    names by index."""
    live: dict[int, int] = {}
    total = peak = 0
    for index, (ptr, size) in enumerate(records):
        total -= live.pop(ptr, 0)
        if size > 0 and index not in skip:
            live[ptr] = size
            total += size
        peak = max(peak, total)
    return peak


def step_peak(rank: int, port: int, cfg: RunConfig, steps: int = 2) -> tuple[int, int]:
    """This process as rank ``rank`` of ``cfg``'s layout: build, run ``steps`` optimizer steps,
    return bounds of the peak bytes the CPU allocator held (``_peak_bounds``; step 2 on: Adam's
    m and v exist)."""
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
                alive = _alive_storages()
            return _peak_bounds(prof, alive)
        finally:
            parallel.shutdown()

"""What one step achieved: tokens/s, model TFLOP/s and MFU per GPU, peak memory.

The FLOPs come from ``launch.planning.flops.flops_per_token``, the formula the planner predicts with, so
a predicted and a measured MFU mean the same thing. MFU is reported on GPUs only: it is the
achieved model FLOP/s over ``cluster.gpu``'s dense bf16 peak, and a CPU has no such peak.
"""
from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

from launch.schema import RunConfig
from launch.planning.flops import GPU_PEAK_BF16_TFLOPS, flops_per_token

_GIB = 2**30


@dataclass(frozen=True)
class Throughput:
    """Per-run constants of the step metrics."""

    flops_per_token: float
    world_size: int
    seq_length: int
    peak_flops_per_gpu: float | None
    """Dense bf16 peak of one GPU; None on CPU ranks (no MFU)."""

    @classmethod
    def from_config(cls, cfg: RunConfig, world_size: int, use_gpu: bool) -> "Throughput":
        peak = GPU_PEAK_BF16_TFLOPS[cfg.cluster.gpu] * 1e12 if use_gpu else None
        return cls(flops_per_token(cfg.model, cfg.train.seq_length), world_size,
                   cfg.train.seq_length, peak)

    def values(self, tokens: int, step_s: float, consumed_samples: int) -> dict[str, float]:
        """The step's speed, per job and per GPU, and the tokens trained so far."""
        tokens_per_s = tokens / step_s
        per_gpu_flops = tokens_per_s * self.flops_per_token / self.world_size
        out = {"step_time_s": step_s, "tokens": tokens, "tokens_per_s": tokens_per_s,
               "tokens_per_s_per_gpu": tokens_per_s / self.world_size,
               "tflops_per_s_per_gpu": per_gpu_flops / 1e12,
               "consumed_tokens": consumed_samples * self.seq_length}
        if self.peak_flops_per_gpu:
            out["mfu"] = per_gpu_flops / self.peak_flops_per_gpu
        return out


def peak_memory(use_gpu: bool) -> dict[str, float]:
    """This rank's peak so far: the allocator's on a GPU (what launch.planning.memory predicts), the
    process's resident set on CPU (Linux reports ``ru_maxrss`` in KiB)."""
    if use_gpu:
        return {"peak_memory_allocated_gib": torch.cuda.max_memory_allocated() / _GIB,
                "peak_memory_reserved_gib": torch.cuda.max_memory_reserved() / _GIB}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / _GIB}

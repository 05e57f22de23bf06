"""Predict the peak GPU memory of one training step for the worst rank of a layout.

Pure Python, no torch: the planner calls ``predict`` thousands of times per search.
Units: bytes inside, GiB (2**30 bytes) in ``MemoryBreakdown``. Notation: L layers, h hidden,
a heads, g query groups, d = h/a, f ffn width, V padded vocabulary, s sequence, b micro-batch,
t = TP, p = PP, v = VPP, c = CP, m = micro-batches per step.

Sources: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (activation bytes per layer, sequence parallelism, selective recomputation);
Megatron-LM's theoretical memory report (``megatron/training/theoretical_memory_usage.py``:
bytes per parameter with and without the distributed optimizer, the interleaved in-flight
factor, logits on the last stage); Fujii et al. 2024, "Accelerating Large Language Model
Training with 4D Parallelism and Memory Consumption Estimator" (the same terms per stage, and
fixed overheads). The terms follow what ``megatron_ext`` builds: megatron-core's DDP with
``grad_reduce_in_fp32=True``, Adam, ``recompute_method=uniform``, unfused cross entropy.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Optional

from launch.schema import Layout, RunConfig
from tools.flops import kv_channels, layer_linear_params, layer_params, padded_vocab_size

GIB = 2**30
SAFETY_MARGIN = 0.05
"""``fits`` means peak <= (1 - margin) * cluster.gpu_memory_gib: room for what no term models."""
CUDA_CONTEXT_GIB = 0.6
"""CUDA context with cuBLAS/cuDNN handles, outside torch's allocator (~550 MiB on H100, CUDA 12)."""
NCCL_GIB_PER_GROUP = 0.25
"""NCCL channel buffers per communicator of size > 1 (NCCL_BUFFSIZE 4 MiB x channels x peers)."""
TE_WORKSPACE_GIB = 0.125
"""Transformer Engine's cuBLASLt workspaces (32 MiB per stream) and fp8 scaling state."""
FRAGMENTATION = 0.05
"""Allocator reserve above the tensors' peak (reserved - allocated), as a fraction of tensors."""


@dataclass(frozen=True)
class MemoryBreakdown:
    """Per-GPU memory of the worst rank, each term in GiB."""

    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    overhead_gib: float
    limit_gib: float
    """(1 - SAFETY_MARGIN) * cluster.gpu_memory_gib."""
    stage: str
    """Which pipeline stage is the worst rank: ``first`` or ``last``."""

    @property
    def peak_gib(self) -> float:
        return (self.weights_gib + self.gradients_gib + self.optimizer_gib
                + self.activations_gib + self.overhead_gib)

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.limit_gib

    def as_dict(self) -> dict:
        """The documented JSON: ``peak_gib``, ``fits`` and every term."""
        return {"peak_gib": self.peak_gib, "fits": self.fits, **dataclasses.asdict(self)}


def bytes_per_param(precision: str) -> tuple[int, int, int]:
    """(weight, gradient, optimizer) bytes per parameter.

    bf16/fp8: bf16 weights (2), an fp32 DDP gradient buffer (4, ``grad_reduce_in_fp32``), and
    fp32 master weights + Adam m and v (12). fp32: the weights are the master copy, so 4, 4
    and 8 (m, v). Megatron's report: 18 bytes/param, or 6 + 12/DP with the distributed optimizer.
    """
    return (4, 4, 8) if precision == "fp32" else (2, 4, 12)


def stage_params(cfg: RunConfig, layout: Layout, *, first: bool, last: bool) -> tuple[int, int]:
    """(transformer-layer params, embedding/output params) held by one rank of a stage.

    Each rank holds L/p layers; matrices are split over t, RMSNorm weights are replicated. The
    first stage holds the V x h / t embedding; the last the V x h / t output layer, which with
    tied embeddings is a copy of the embedding when p > 1 and shared when p == 1.
    """
    m = cfg.model
    layers = m.num_layers // layout.pp
    norms = layer_params(m) - layer_linear_params(m)
    in_layers = layers * (layer_linear_params(m) // layout.tp + norms)
    in_layers += m.hidden_size if last else 0  # the final RMSNorm
    table = padded_vocab_size(m, layout.tp) * m.hidden_size // layout.tp
    shared = first and last and not m.untie_embeddings_and_output_weights
    return in_layers, (1 if shared else int(first) + int(last)) * table


def layer_activation_bytes(cfg: RunConfig, layout: Layout, b: int, *,
                           scores: bool = True) -> float:
    """Bytes one layer stores for backward for one micro-batch, without recomputation.

    Korthikanti et al.'s count (34 s b h for GPT) redone for a Llama layer with no dropout:
    per token, 2-byte tensors of width 8h replicated over TP unless SP (both RMSNorm inputs and
    outputs), and 4h + 4gd + 6f split over TP (Q, K, V after RoPE, the attention output, the
    SwiGLU fc1 output 2f and its product f). Unfused attention adds 5 a s^2 b / t bytes (scores,
    softmax, dropout output); flash and fused kernels keep only O(s) statistics. CP divides s.
    ``scores=False`` leaves the s^2 term out (selective recomputation recomputes it).
    """
    m, s = cfg.model, cfg.train.seq_length / layout.cp
    h, t = m.hidden_size, layout.tp
    replicated = 8 * h / (t if layout.sp else 1)
    split = (4 * h + 4 * m.num_query_groups * kv_channels(m) + 6 * m.ffn_hidden_size) / t
    unfused = scores and m.attention_backend == "unfused"
    square = 5 * m.num_attention_heads * cfg.train.seq_length / t if unfused else 0.0
    return s * b * (replicated + split + square)


def in_flight_layers(cfg: RunConfig, layout: Layout, m: int, *, rank: int) -> float:
    """Layer-micro-batches whose activations pipeline rank ``rank`` holds at its peak.

    1F1B: rank r runs p - r forwards before its first backward, each over L/p layers, at most
    m (so the first stage holds min(p, m) * L/p). Interleaved: 2(p - r - 1) + (v - 1) p + 1
    chunks of L/(p v) layers, at most m v; for r = 0 that is Megatron's L (1 + (p-1)/(p v)).
    """
    L, p, v = cfg.model.num_layers, layout.pp, layout.vpp
    if v == 1:
        return min(p - rank, m) * L / p
    return min(2 * (p - rank - 1) + (v - 1) * p + 1, m * v) * L / (p * v)


def activation_bytes(cfg: RunConfig, layout: Layout, b: int, recompute: str, *,
                     first: bool, last: bool) -> float:
    """Activations of one rank at its peak, for ``recompute`` none, selective or full.

    stored = in-flight layers x per-layer bytes, where per-layer bytes are: all of them (none);
    all but the unfused s^2 scores (selective recomputes core attention); or only the 2 s b h
    (/t with SP) input of each group of ``recompute_num_layers`` layers (full, uniform).
    Plus the backward working set: one group's full activations (the gradients of a layer are
    about the size of its activations). First stage: token ids, 8 s b per in-flight micro-batch.
    Last stage: final norm input, the gathered output-layer input, and 6 s b V / t bytes of
    logits (bf16 output + the fp32 copy cross entropy keeps for backward).
    """
    m, s = cfg.model, cfg.train.seq_length / layout.cp
    micro_batches = max(cfg.train.global_batch_size // (b * layout.dp), 1)
    rank = 0 if first else layout.pp - 1
    layers = in_flight_layers(cfg, layout, micro_batches, rank=rank)
    full_layer = layer_activation_bytes(cfg, layout, b)
    group = cfg.train.recompute_num_layers if recompute == "full" else 1
    if recompute == "full":
        stored = layers / group * 2 * s * b * m.hidden_size / (layout.tp if layout.sp else 1)
    else:
        stored = layers * layer_activation_bytes(cfg, layout, b, scores=recompute == "none")
    out = stored + group * full_layer
    if first:
        out += 8 * s * b * min(layout.pp, micro_batches)
    if last:
        h, t = m.hidden_size, layout.tp
        out += s * b * (2 * h / (t if layout.sp else 1) + 2 * h + 6 * padded_vocab_size(m, t) / t)
    return out


def overhead_gib(cfg: RunConfig, layout: Layout, tensors_gib: float) -> float:
    """CUDA context + NCCL buffers per communicator + TE workspace + allocator fragmentation."""
    groups = sum(size > 1 for size in (layout.tp, layout.pp, layout.cp, layout.dp * layout.cp))
    te = TE_WORKSPACE_GIB if cfg.model.transformer_impl == "transformer_engine" else 0.0
    return CUDA_CONTEXT_GIB + NCCL_GIB_PER_GROUP * groups + te + FRAGMENTATION * tensors_gib


def state_bytes(cfg: RunConfig, layout: Layout, *, first: bool, last: bool) -> tuple[float, ...]:
    """(weights, gradients, optimizer) bytes of one stage's rank: its parameters times
    ``bytes_per_param``, the optimizer part divided by DP x CP (the group megatron-core's
    distributed optimizer shards over) when ``optimizer.distributed``. fp8 adds TE's cached
    fp8 copy of each layer weight and its transpose (2 bytes per layer parameter)."""
    weight, grad, optim = bytes_per_param(cfg.train.precision)
    in_layers, tables = stage_params(cfg, layout, first=first, last=last)
    params = in_layers + tables
    shards = layout.dp * layout.cp if cfg.optimizer.distributed else 1
    weights = params * weight + (2 * in_layers if cfg.train.precision == "fp8" else 0)
    return weights, params * grad, params * optim / shards


def predict_all(cfg: RunConfig, layout: Layout,
                settings: list[tuple[int, str]]) -> list[MemoryBreakdown]:
    """``predict`` for each (micro_batch_size, recompute) pair; the parameter-dependent terms
    are computed once per stage, which keeps the planner's search fast."""
    stages = [(True, layout.pp == 1)] + ([(False, True)] if layout.pp > 1 else [])
    state = [(first, last, state_bytes(cfg, layout, first=first, last=last))
             for first, last in stages]
    limit = (1 - SAFETY_MARGIN) * cfg.cluster.gpu_memory_gib
    out = []
    for b, recompute in settings:
        candidates = []
        for first, last, (weights, grads, optimizer) in state:
            acts = activation_bytes(cfg, layout, b, recompute, first=first, last=last)
            tensors = (weights + grads + optimizer + acts) / GIB
            candidates.append(MemoryBreakdown(
                weights_gib=weights / GIB, gradients_gib=grads / GIB,
                optimizer_gib=optimizer / GIB, activations_gib=acts / GIB,
                overhead_gib=overhead_gib(cfg, layout, tensors), limit_gib=limit,
                stage="first" if first else "last"))
        out.append(max(candidates, key=lambda m: m.peak_gib))
    return out


def predict(cfg: RunConfig, layout: Layout, *, micro_batch_size: Optional[int] = None,
            recompute: Optional[str] = None) -> MemoryBreakdown:
    """Peak memory of the worst rank (first or last pipeline stage) of ``layout``.

    ``micro_batch_size`` and ``recompute`` override ``cfg.train`` so the planner can try
    values without copying the config.
    """
    b = micro_batch_size or cfg.train.micro_batch_size
    return predict_all(cfg, layout, [(b, recompute or cfg.train.recompute)])[0]


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m tools.memory [--json] [overrides]``: the breakdown for the config's layout."""
    from launch.config import derive_layout  # CLI only: Hydra stays off the pure path
    from tools.report import load_config, memory_table

    args = sys.argv[1:] if argv is None else argv
    cfg, as_json = load_config(args, auto_ok=False)
    layout = derive_layout(cfg)
    breakdown = predict(cfg, layout)
    if as_json:
        print(json.dumps({**breakdown.as_dict(), "layout": dataclasses.asdict(layout)}))
    else:
        print(memory_table(cfg, layout, breakdown))


if __name__ == "__main__":
    main()

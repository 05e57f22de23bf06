"""Predict the peak GPU memory of one training step for the worst rank of a layout.

Pure Python, no torch: the planner calls ``predict`` thousands of times per search.
Units: bytes inside, GiB (2**30 bytes) in ``MemoryBreakdown``. Notation: L layers, h hidden,
a heads, g query groups, d = h/a, kv = g d, f ffn width, V padded vocabulary, s sequence
(per CP rank), b micro-batch, e bytes per activation element, t = TP, p = PP, v = VPP,
c = CP, m = micro-batches per step.

Sources: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (activations per layer, sequence parallelism, selective recomputation); Megatron-LM's
theoretical memory report (``megatron/training/theoretical_memory_usage.py``: bytes per
parameter with and without the distributed optimizer, the interleaved in-flight factor);
Fujii et al. 2024, "Accelerating Large Language Model Training with 4D Parallelism and Memory
Consumption Estimator" (the same terms per stage, and fixed overheads). Their per-layer counts
assume a GPT layer; the tensors here are what megatron-core 0.16.1 saves for backward in the
Llama layer ``megatron_ext`` builds (RMSNorm, GQA, SwiGLU through megatron's unfused GLU or,
``kernels.bias_activation_fusion``, its fused ``bias_swiglu``, unfused RoPE, no dropout), with
DDP gradients in fp32 or bf16 (``optimizer.grad_reduce_in_fp32``), Adam,
``recompute_method=uniform`` and megatron's vocab-parallel cross entropy. The local spec's
count is checked exactly on CPU (tests/unit/test_memory_activations.py); the Transformer Engine
spec's follows TE's ``LayerNormLinear`` and fused attention, and the whole prediction is
compared with GPU measurements in tests/unit/test_memory_measured.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from launch.parallel_schema import rank_layers
from launch.schema import Layout, ModelConfig, RunConfig
from launch.planning.flops import kv_channels, layer_linear_params, layer_params, padded_vocab_size

GIB = 2**30
SAFETY_MARGIN = 1 - 79.18 / 80
"""``fits`` means required <= (1 - margin) * cluster.gpu_memory_gib: the memory CUDA lets a
process use, 79.18 GiB of an H100 80GB (shared/data/memory_h100_calibration.jsonl); the rest
is the driver's. Everything else is a modelled term (fragmentation, context), not a margin."""
CUDA_CONTEXT_GIB = 0.6
"""CUDA context with cuBLAS/cuDNN handles, outside torch's allocator (~550 MiB on H100, CUDA 12)."""
NCCL_GIB_PER_GROUP = 0.25
"""NCCL channel buffers per communicator of size > 1 (NCCL_BUFFSIZE 4 MiB x channels x peers),
outside torch's allocator."""
TE_WORKSPACE_GIB = 0.125
"""Transformer Engine's cuBLASLt workspaces (32 MiB per stream) and fp8 scaling state, allocated
through torch."""
FRAGMENTATION = {"none": 0.040, "selective": 0.215, "full": 0.215}
"""Allocator reserve above the tensors' peak (reserved - allocated), as a fraction of the
allocated peak: the largest gap measured in shared/data/memory_h100_calibration.jsonl, without
recomputation (1.2-4.0%, 1B shape at seq 2048) and with it (5.3-21.5%, 1B shape at seq 2048,
mbs 8, full: layers rerun in backward free and reallocate their tensors in a cache that cannot
reuse the holes)."""


@dataclass(frozen=True)
class MemoryBreakdown:
    """Per-GPU memory of the worst rank, each term in GiB."""

    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    """At the forward/backward peak: saved tensors, the larger transient, the score buffer."""
    optimizer_step_gib: float
    """Live during the optimizer step instead of the activations (torch AdamW's temporaries,
    the score buffer): the step's peak is the larger of the two phases."""
    workspace_gib: float
    """Transformer Engine workspaces (allocated through torch, so part of ``allocated_gib``)."""
    fragmentation_gib: float
    """What torch's caching allocator reserves beyond the allocated peak."""
    context_gib: float
    """CUDA context and NCCL buffers: device memory torch's counters never see."""
    limit_gib: float
    """(1 - SAFETY_MARGIN) * cluster.gpu_memory_gib."""
    stage: str
    """Which pipeline stage is the worst rank: ``first`` or ``last``."""

    @property
    def allocated_gib(self) -> float:
        """Compares with ``torch.cuda.max_memory_allocated()``."""
        return (self.weights_gib + self.gradients_gib + self.optimizer_gib
                + max(self.activations_gib, self.optimizer_step_gib) + self.workspace_gib)

    @property
    def reserved_gib(self) -> float:
        """Compares with ``torch.cuda.max_memory_reserved()``."""
        return self.allocated_gib + self.fragmentation_gib

    @property
    def overhead_gib(self) -> float:
        return self.workspace_gib + self.fragmentation_gib + self.context_gib

    @property
    def peak_gib(self) -> float:
        """The documented interface: the predicted peak *allocated* memory (``allocated_gib``),
        the number ``torch.cuda.max_memory_allocated()`` is measured against."""
        return self.allocated_gib

    @property
    def required_gib(self) -> float:
        """All the device memory the rank needs (reserved + CUDA context and NCCL buffers):
        what must fit under ``limit_gib``."""
        return self.reserved_gib + self.context_gib

    @property
    def fits(self) -> bool:
        return self.required_gib <= self.limit_gib

    def as_dict(self) -> dict:
        """The documented JSON: ``peak_gib``, ``fits``, torch's two counters and every term."""
        return {"peak_gib": self.peak_gib, "fits": self.fits, "required_gib": self.required_gib,
                "allocated_gib": self.allocated_gib,
                "reserved_gib": self.reserved_gib, "overhead_gib": self.overhead_gib,
                **dataclasses.asdict(self)}


def bytes_per_param(precision: str, grad_reduce_in_fp32: bool = True) -> tuple[int, int, int]:
    """(weight, gradient, optimizer) bytes per parameter.

    bf16/fp8: bf16 weights (2), the DDP gradient buffer in fp32 (4, ``grad_reduce_in_fp32``) or
    in the weights' bf16 (2), and fp32 master weights + Adam m and v (12). fp32: the weights are
    the master copy, so 4, 4 and 8 (m, v). Megatron's report: 18 bytes/param, or 6 + 12/DP with
    the distributed optimizer (fp32 gradients).
    """
    if precision == "fp32":
        return 4, 4, 8
    return 2, 4 if grad_reduce_in_fp32 else 2, 12


def stage_params(cfg: RunConfig, layout: Layout, *, first: bool, last: bool) -> tuple[int, int]:
    """(transformer-layer params, embedding/output params) held by one rank of a stage.

    Each rank holds its stage's layers (L/p, or megatron's uneven split: ``stage_layers``);
    matrices are split over t, RMSNorm weights are replicated. The
    first stage holds the V x h / t embedding; the last the V x h / t output layer, which with
    tied embeddings is a copy of the embedding when p > 1 and shared when p == 1.
    """
    m = cfg.model
    layers = rank_layers(m.num_layers, layout, 0 if first else -1)
    norms = layer_params(m) - layer_linear_params(m)
    in_layers = layers * (layer_linear_params(m) // layout.tp + norms)
    in_layers += m.hidden_size if last else 0  # the final RMSNorm
    table = padded_vocab_size(m, layout.tp) * m.hidden_size // layout.tp
    shared = first and last and not m.untie_embeddings_and_output_weights
    return in_layers, (1 if shared else int(first) + int(last)) * table


def activation_element_bytes(precision: str) -> int:
    """e: fp32 runs keep fp32 activations; bf16 and fp8 runs keep bf16 ones (TE's fp8 GEMMs also
    keep fp8 copies of some inputs, about h/t per token per layer: not modelled)."""
    return 4 if precision == "fp32" else 2


def scores_materialized(model: ModelConfig) -> bool:
    """The local spec's attention always builds the s x s scores; TE's only when unfused."""
    return model.transformer_impl == "local" or model.attention_backend == "unfused"


def norm_bytes(cfg: RunConfig, layout: Layout) -> float:
    """Per token: one RMSNorm and the input the linear layer after it saves.

    TE (``LayerNormLinear``; ``TENorm`` and the output layer on the last stage): the norm's input
    and output plus an fp32 rsigma, 2 h e + 4, sequence-split with SP. Local spec (torch's
    composite RMSNorm): input, rstd, input x rstd and output, (3 h + 1) e.
    """
    h, e = cfg.model.hidden_size, activation_element_bytes(cfg.train.precision)
    if cfg.model.transformer_impl == "local":
        return (3 * h + 1) * e
    return (2 * h * e + 4) / (layout.tp if layout.sp else 1)


def layer_saved_bytes(cfg: RunConfig, layout: Layout, b: int, recompute: str) -> float:
    """Bytes one layer saves for backward for one micro-batch, recompute ``none`` or ``selective``.

    Per token: two ``norm_bytes``; the SwiGLU MLP's 5 f e / t (fc1's 2f output, SiLU's output,
    megatron's ``x_linear + glu_linear_offset`` and their product), or fused
    (``kernels.bias_activation_fusion``) 3 f e / t (fc1's output, which megatron's
    ``SwiGLUFunction`` keeps to recompute SiLU, and its f-wide result fc2 keeps); attention,
    split over TP:
      none, TE: Q, K, V (contiguous copies TE makes) and the output, (2 h + 2 kv) e / t, plus the
        fp32 softmax statistics of flash/fused attention, 4 a / t;
      none, local: Q, the output and K, V as core attention keeps them: repeated to a heads
        (2 h) with GQA, or K and the fused QKV output V views (h + 3 kv) without;
      selective (both): megatron's checkpoint of core attention keeps Q and K after RoPE and,
        through V's view, the whole fused QKV output: (3 h + 3 kv) e / t.
    Per sequence: RoPE's cos and sin for Q and K, 4 s d e. Materialised scores (recompute none):
    the fp32 softmax output and its cast back to e (Korthikanti's a s^2 b terms; no dropout
    here), a s^2 b (4 + e) / t, or 4 a s^2 b / t in fp32, plus the s x s bool causal mask.

    Context parallelism: s is the rank's s/c tokens. The local spec's CP attention (the CPU
    rehearsal, megatron_ext/cp_attention.py) gathers K and V of all s c tokens, 2 h e / t each
    (new storages, repeated or viewed per head), and scores s x s c of them.
    """
    m, e = cfg.model, activation_element_bytes(cfg.train.precision)
    s, t = cfg.train.seq_length / layout.cp, layout.tp
    h, a, d = m.hidden_size, m.num_attention_heads, kv_channels(m)
    kv = m.num_query_groups * d
    gathered = m.transformer_impl == "local" and layout.cp > 1 and recompute == "none"
    s_kv = s * layout.cp if gathered else s  # the keys each query sees
    keys_values = 0.0  # bytes of the K and V core attention keeps, when per gathered token
    if recompute == "selective":
        attention = (3 * h + 3 * kv) * e / t
    elif gathered:
        attention, keys_values = 2 * h * e / t, s_kv * b * 2 * h * e / t
    elif m.transformer_impl == "local":
        attention = (2 * h + (2 * h if a > m.num_query_groups else h + 3 * kv)) * e / t
    else:
        attention = (2 * h + 2 * kv) * e / t + (0 if scores_materialized(m) else 4 * a / t)
    mlp = 3 if cfg.kernels.bias_activation_fusion else 5
    per_token = 2 * norm_bytes(cfg, layout) + attention + mlp * m.ffn_hidden_size * e / t
    out = s * b * per_token + keys_values + 4 * s * d * e
    if recompute == "none" and scores_materialized(m):
        cast = 0 if e == 4 else e
        out += a * s * s_kv * b * (4 + cast) / t + s * s_kv
    return out


def in_flight_layers(cfg: RunConfig, layout: Layout, m: int, *, rank: int) -> float:
    """Layer-micro-batches whose activations pipeline rank ``rank`` holds at its peak.

    1F1B: rank r runs p - r forwards before its first backward, each over its n_r layers (L/p
    when even), at most m (so the first stage holds min(p, m) * n_0). Interleaved: 2(p - r - 1)
    + (v - 1) p + 1 chunks of n_r / v layers, at most m v; for r = 0 and an even split that is
    Megatron's L (1 + (p-1)/(p v)).
    """
    p, v = layout.pp, layout.vpp
    layers = rank_layers(cfg.model.num_layers, layout, rank)
    if v == 1:
        return min(p - rank, m) * layers
    return min(2 * (p - rank - 1) + (v - 1) * p + 1, m * v) * layers / v


def saved_activation_bytes(cfg: RunConfig, layout: Layout, b: int, recompute: str, *,
                           first: bool, last: bool) -> float:
    """What one rank keeps for backward at its peak: ``in_flight_layers`` x ``layer_saved_bytes``.

    With full recomputation only the input of each checkpointed group of
    ``recompute_num_layers`` layers (s b h e, /t with SP; megatron needs the groups to tile each
    model chunk) plus RoPE's fp32 frequencies the checkpoints share (4 s d). First stage: the
    int64 token ids, 8 s b per in-flight micro-batch, and with TP the vocab-parallel embedding's
    masked int64 ids and bool out-of-range mask it saves, 9 s b more. Last stage: the final norm
    (``norm_bytes``), the fp32 logits megatron's cross entropy keeps (its softmax, computed in
    place: 4 V / t per token) and its int64 targets and bool mask (9 per token).
    """
    m, e = cfg.model, activation_element_bytes(cfg.train.precision)
    s, t = cfg.train.seq_length / layout.cp, layout.tp
    micro_batches = max(cfg.train.global_batch_size // (b * layout.dp), 1)
    layers = in_flight_layers(cfg, layout, micro_batches, rank=0 if first else layout.pp - 1)
    if recompute == "full":
        groups = layers / cfg.train.recompute_num_layers
        split = layout.tp if layout.sp else 1
        out = groups * s * b * m.hidden_size * e / split + 4 * s * kv_channels(m)
    else:
        out = layers * layer_saved_bytes(cfg, layout, b, recompute)
    if first:
        out += (8 + (9 if t > 1 else 0)) * s * b * min(layout.pp, micro_batches)
    if last:
        out += s * b * (norm_bytes(cfg, layout) + 4 * padded_vocab_size(m, t) / t + 9)
    return out


def activation_bytes(cfg: RunConfig, layout: Layout, b: int, recompute: str, *,
                     first: bool, last: bool) -> float:
    """Activations of one rank at its forward/backward peak (``peak.activation_peak_bytes``:
    what it saved, the backward or loss transient, the local spec's score buffer)."""
    from launch.planning.peak import activation_peak_bytes  # peak.py builds on this module
    return activation_peak_bytes(cfg, layout, b, recompute, first=first, last=last)


def state_bytes(cfg: RunConfig, layout: Layout, *, first: bool, last: bool) -> tuple[float, ...]:
    """(weights, gradients, optimizer) bytes of one stage's rank: its parameters times
    ``bytes_per_param``, the optimizer part divided by DP x CP (the group megatron-core's
    distributed optimizer shards over) when ``optimizer.distributed``. fp8 adds TE's cached
    fp8 copy of each layer weight and its transpose (2 bytes per layer parameter)."""
    weight, grad, optim = bytes_per_param(cfg.train.precision, cfg.optimizer.grad_reduce_in_fp32)
    in_layers, tables = stage_params(cfg, layout, first=first, last=last)
    params = in_layers + tables
    shards = layout.dp * layout.cp if cfg.optimizer.distributed else 1
    weights = params * weight + (2 * in_layers if cfg.train.precision == "fp8" else 0)
    return weights, params * grad, params * optim / shards


def context_gib(layout: Layout) -> float:
    """Outside torch's allocator: the CUDA context and NCCL's buffers per communicator (TP, PP,
    CP and the DP x CP gradient group, when larger than one rank)."""
    groups = sum(size > 1 for size in (layout.tp, layout.pp, layout.cp, layout.dp * layout.cp))
    return CUDA_CONTEXT_GIB + NCCL_GIB_PER_GROUP * groups


def predict_all(cfg: RunConfig, layout: Layout,
                settings: list[tuple[int, str]]) -> list[MemoryBreakdown]:
    """``predict`` for each (micro_batch_size, recompute) pair; the parameter-dependent terms
    are computed once per stage, which keeps the planner's search fast."""
    stages = [(True, layout.pp == 1)] + ([(False, True)] if layout.pp > 1 else [])
    state = [(first, last, state_bytes(cfg, layout, first=first, last=last))
             for first, last in stages]
    limit = (1 - SAFETY_MARGIN) * cfg.cluster.gpu_memory_gib
    workspace = TE_WORKSPACE_GIB if cfg.model.transformer_impl == "transformer_engine" else 0.0
    context = context_gib(layout)
    from launch.planning.peak import optimizer_step_bytes  # peak.py builds on this module
    out = []
    for b, recompute in settings:
        candidates = []
        for first, last, (weights, grads, optimizer) in state:
            acts = activation_bytes(cfg, layout, b, recompute, first=first, last=last)
            main_params = optimizer / bytes_per_param(cfg.train.precision)[2]
            step = optimizer_step_bytes(cfg, layout, b, main_params)
            tensors = (weights + grads + optimizer + max(acts, step)) / GIB
            candidates.append(MemoryBreakdown(
                weights_gib=weights / GIB, gradients_gib=grads / GIB,
                optimizer_gib=optimizer / GIB, activations_gib=acts / GIB,
                optimizer_step_gib=step / GIB,
                workspace_gib=workspace,
                fragmentation_gib=FRAGMENTATION[recompute] * (tensors + workspace),
                context_gib=context, limit_gib=limit, stage="first" if first else "last"))
        out.append(max(candidates, key=lambda m: m.required_gib))
    return out


def predict(cfg: RunConfig, layout: Layout, *, micro_batch_size: Optional[int] = None,
            recompute: Optional[str] = None) -> MemoryBreakdown:
    """Peak memory of the worst rank (first or last pipeline stage) of ``layout``.

    ``micro_batch_size`` and ``recompute`` override ``cfg.train`` so the planner can try
    values without copying the config.
    """
    b = micro_batch_size or cfg.train.micro_batch_size
    return predict_all(cfg, layout, [(b, recompute or cfg.train.recompute)])[0]

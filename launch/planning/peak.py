"""The peak of a whole training step: forward, backward (recomputation included) and optimizer.

``memory.saved_activation_bytes`` counts what a rank keeps for backward. The step's peak is
higher: the backward pass of a layer holds its saved tensors *and* their gradients, a layer
recomputed in backward rebuilds its saved tensors first, the local spec keeps a persistent
buffer for the attention scores, and torch's AdamW allocates a temporary per parameter. Each of
these is a separate term below; ``activation_peak_bytes`` and ``optimizer_step_bytes`` combine
them for one rank. Notation as in memory.py.

How the terms were found: tests/unit/test_memory_peak.py runs real megatron-core steps on CPU
ranks under torch.profiler's allocator records (``tests/unit/megatron_step_memory.py``) and
reads the live-bytes timeline; the per-tensor sequences quoted below are from those records,
and the local spec's terms (``local_backward_bytes``, ``schedule_bytes``) list every tensor
live at the peak of those fp32 steps, one rank, TP, CP, PP and VPP.
"""
from __future__ import annotations

from launch.schema import Layout, RunConfig
from launch.planning.flops import kv_channels, padded_vocab_size
from launch.parallel_schema import rank_layers
from launch.planning.memory import (activation_element_bytes, in_flight_layers,
                                    layer_saved_bytes, norm_bytes, saved_activation_bytes,
                                    scores_materialized)

SCORE_PEAK_BYTES = {4: 16, 2: 12}
"""Bytes per score element live at the peak of the local spec's attention backward, by e.
fp32: ``input.float()`` is the scores themselves, so megatron's in-place ``masked_fill_`` writes
into a view of baddbmm's output and its backward runs through CopySlices: AsStridedBackward's
zeros of that output, CopySlices' result and its clone of the gradient, and masked_fill's
clone, four fp32 tensors, after the saved softmax output was freed (CPU records). bf16: the
mask is filled into the fp32 copy, no view; the peak is the softmax backward, its fp32 output
(saved), the fp32 gradient of that output and of its input, the e-byte probabilities megatron
saved for the scores x V product freed just before (CPU records: +2 +4 -2 +4 per e = 2 layer)."""
RERUN_SCORES_BYTES = 4
"""Measured only on GPU in bf16 (shared/data/memory_h100_calibration.jsonl, every recompute row
of the local spec): one more fp32 score tensor is live while a recomputed attention runs
backward than the CPU records show. Cause not found (the CPU rerun of the same megatron code
holds none, in bf16 or fp32); modelled for bf16 and fp8 so that ``fits`` never trusts the
lower CPU figure on a GPU. Not added in fp32, whose CPU records account for every tensor of the
rerun's backward (the four of ``SCORE_PEAK_BYTES``; no GPU row is fp32)."""
ADAM_TEMP_BYTES = 4
"""torch's foreach AdamW (megatron's optimizer when neither Transformer Engine nor Apex is
importable, so the local spec on GPU) computes sqrt(v) for a whole parameter group at once:
one fp32 temporary per main parameter the rank updates (torch/optim/adam.py,
``_multi_tensor_adam``)."""


def score_elements(cfg: RunConfig, layout: Layout, b: int) -> float:
    """Elements of one layer's s x s_kv attention scores on this rank (0 when none are built):
    a/t heads, b sequences, s/c queries against s/c keys (s keys under the CPU's CP gather)."""
    m = cfg.model
    if not scores_materialized(m):
        return 0.0
    s = cfg.train.seq_length / layout.cp
    return m.num_attention_heads / layout.tp * b * s * keys_seen(cfg, layout)


def score_buffer_bytes(cfg: RunConfig, layout: Layout, b: int) -> float:
    """megatron's ``get_global_memory_buffer()`` tensor that the local attention's ``baddbmm``
    takes as its (ignored, beta=0) input: one e-byte score tensor, allocated by the first
    forward and kept for the rest of the run (it never shows among the saved tensors)."""
    if cfg.model.transformer_impl != "local":
        return 0.0
    return activation_element_bytes(cfg.train.precision) * score_elements(cfg, layout, b)


def saved_score_bytes(cfg: RunConfig, layout: Layout, b: int) -> float:
    """What one layer saves of its scores (recompute none): fp32 softmax output + e-byte cast."""
    e = activation_element_bytes(cfg.train.precision)
    return (4 + (0 if e == 4 else e)) * score_elements(cfg, layout, b)


def keys_seen(cfg: RunConfig, layout: Layout) -> float:
    """s_kv, the keys each query sees: the rank's s/c, or all s under the local spec's CP
    gather (megatron_ext/cp_attention.py)."""
    s = cfg.train.seq_length / layout.cp
    return s * layout.cp if (cfg.model.transformer_impl == "local" and layout.cp > 1) else s


def _token_widths(cfg: RunConfig, layout: Layout) -> tuple[float, float, float]:
    """(residual, head-split, freed) bytes per token of a local-spec layer in backward.

    residual: one residual-stream tensor, h e (/t with SP); head-split: one h-wide attention
    tensor, h e / t; freed: what the first layer to run backward has released by the time its
    core attention runs backward, because the backward of those modules ran first: the MLP's
    saved tensors (``layer_saved_bytes``' 5 f e / t, fused 3 f e / t), the second RMSNorm's
    (``norm_bytes``) and the context linear_proj keeps (h e / t)."""
    m, e, t = cfg.model, activation_element_bytes(cfg.train.precision), layout.tp
    mlp = (3 if cfg.kernels.bias_activation_fusion else 5) * m.ffn_hidden_size * e / t
    head_split = m.hidden_size * e / t
    residual = m.hidden_size * e / (t if layout.sp else 1)
    return residual, head_split, mlp + norm_bytes(cfg, layout) + head_split


def kept_value_bytes(cfg: RunConfig, layout: Layout, b: int) -> float:
    """The storage core attention keeps for V, freed once the scores x V bmm ran backward: V
    repeated to a heads with GQA (h e / t per token), else the fused QKV output V views
    ((h + 2 kv) e / t); under the local spec's CP, the gathered V of all s tokens (h e / t)."""
    m, e, t = cfg.model, activation_element_bytes(cfg.train.precision), layout.tp
    if m.transformer_impl == "local" and layout.cp > 1:
        return keys_seen(cfg, layout) * b * m.hidden_size * e / t
    tokens = cfg.train.seq_length / layout.cp * b
    if m.num_attention_heads > m.num_query_groups:
        return tokens * m.hidden_size * e / t
    return tokens * (m.hidden_size + 2 * m.num_query_groups * kv_channels(m)) * e / t


def local_backward_bytes(cfg: RunConfig, layout: Layout, b: int, recompute: str) -> float:
    """The local spec's backward peak beyond what the rank saved: the first layer to run
    backward, inside its core attention's backward (CPU records, fp32 steps).

    Every mode: ``SCORE_PEAK_BYTES`` per score element; the layer's MLP, second norm and
    linear_proj input are freed (``_token_widths``); two gradients flow, the residual one
    (accumulated in place) and V's from the scores x V bmm (head-split, per key token: all s
    under the CPU's CP gather).
      none: the layer's own saved scores and its V (``kept_value_bytes``) are freed too;
      selective: megatron's checkpoint reruns core attention from its saved Q, K and QKV output:
        K repeated to a heads (GQA) or gathered (CP) again, per key token, the s x s_kv bool
        causal mask and the output context, and the checkpoint holds the context's gradient
        (head-split each); all scores are new; under CP the gather's two int64 position
        vectors (8 s / c each);
      full: the group of ``recompute_num_layers`` layers is rerun from its saved input, each
        saving its ``none`` tensors (``layer_saved_bytes``, the gathered K and V included)
        again, the first norm's input being that saved input; the last layer's scores and V are
        freed as in ``none``; the checkpoint holds the rerun output and its gradient, so the
        residual gradient is accumulated into a new tensor: two residual tensors more than
        ``none``, less the first norm's input, which is the group's saved input.
    Recomputed modes in bf16 or fp8 add ``RERUN_SCORES_BYTES``.
    """
    m, e = cfg.model, activation_element_bytes(cfg.train.precision)
    residual, head_split, freed = _token_widths(cfg, layout)
    s, s_kv = cfg.train.seq_length / layout.cp, keys_seen(cfg, layout)
    tokens, keys = s * b, s_kv * b
    scores = score_elements(cfg, layout, b)
    out = (SCORE_PEAK_BYTES[e] * scores + tokens * (residual - freed) + keys * head_split
           + (0 if recompute == "none" or e == 4 else RERUN_SCORES_BYTES * scores))
    if recompute == "none":
        return out - saved_score_bytes(cfg, layout, b) - kept_value_bytes(cfg, layout, b)
    if recompute == "selective":
        new_keys = m.num_attention_heads > m.num_query_groups or s_kv > s
        positions = 16 * s if s_kv > s else 0
        return (out + s * s_kv + positions + keys * head_split * new_keys
                + tokens * 2 * head_split)
    layers = cfg.train.recompute_num_layers * layer_saved_bytes(cfg, layout, b, "none")
    return (out + layers + tokens * residual - saved_score_bytes(cfg, layout, b)
            - kept_value_bytes(cfg, layout, b))


def backward_working_bytes(cfg: RunConfig, layout: Layout, b: int, recompute: str) -> float:
    """Bytes live during one layer's backward beyond what the rank had saved.

    The local spec: ``local_backward_bytes``. Transformer Engine: the gradients of a layer are
    about the size of what it saved (``layer_saved_bytes(none)``); with unfused attention its
    softmax backward holds 12 bytes per score element (the bf16 column of ``SCORE_PEAK_BYTES``)
    where that is more; selective reruns core attention (all new, plus ``RERUN_SCORES_BYTES``);
    full reruns ``recompute_num_layers`` layers and the softmax backward on top.
    """
    if cfg.model.transformer_impl == "local":
        return local_backward_bytes(cfg, layout, b, recompute)
    layer = layer_saved_bytes(cfg, layout, b, "none")
    scores = score_elements(cfg, layout, b)
    chain = SCORE_PEAK_BYTES[2] * scores
    rerun = 0.0 if recompute == "none" else RERUN_SCORES_BYTES * scores
    if recompute == "none":
        return max(layer, chain - saved_score_bytes(cfg, layout, b))
    if recompute == "selective":
        return max(layer, chain + rerun)
    group = cfg.train.recompute_num_layers * layer
    return group + max(0.0, chain - saved_score_bytes(cfg, layout, b)) + rerun


def rope_cache_bytes(cfg: RunConfig, layout: Layout, recompute: str) -> float:
    """megatron's ``RotaryEmbedding.forward`` is an ``lru_cache``, one per model chunk (v on a
    rank): its fp32 s x d frequencies (4 s d) stay for the run; ``saved_activation_bytes``
    already counts one under full recomputation, where the checkpoints save them."""
    chunks = layout.vpp - (1 if recompute == "full" else 0)
    return chunks * 4 * cfg.train.seq_length / layout.cp * kv_channels(cfg.model)


def loss_working_bytes(cfg: RunConfig, layout: Layout, b: int) -> float:
    """The last stage's e-byte logits live beside their fp32 copy while the loss is computed
    and again as their gradient (s b V e / t; none in fp32, where the copy is the logits)."""
    e = activation_element_bytes(cfg.train.precision)
    s, t = cfg.train.seq_length / layout.cp, layout.tp
    return s * b * padded_vocab_size(cfg.model, t) / t * (0 if e == 4 else e)


def schedule_bytes(cfg: RunConfig, layout: Layout, b: int, recompute: str, *,
                   first: bool, last: bool) -> tuple[float, float]:
    """(at both moments, at the backward only): what the schedule and the batch hold.

    Pipeline (p > 1): the output of every in-flight model chunk whose output went to the next
    stage, one residual tensor each (megatron's ``deallocate_pipeline_outputs`` is off): all of
    a stage's but the last's, whose last chunk ends in the loss (its first v - 1 chunks' outputs,
    ``min(p, m)`` each, with VPP); on every stage but the last, the gradient received for the
    backward it runs, which the schedule holds, so the residual gradient's first accumulation is
    a new tensor (two residual tensors more; full recomputation's checkpoint holds its output's
    gradient anyway). VPP: the next forward's input, received with the backward's gradient (one
    more), and on the first stage the int64 token ids of every in-flight chunk's micro-batch
    (at most; ``saved_activation_bytes`` counts ``min(p, m)``). Context parallelism: the first
    stage also holds the micro-batch's token ids of all s tokens, before the split to s / c."""
    p, v = layout.pp, layout.vpp
    s = cfg.train.seq_length / layout.cp
    residual = s * b * _token_widths(cfg, layout)[0]
    tokens = 8 * cfg.train.seq_length * b if first and layout.cp > 1 else 0.0
    if p == 1:
        return tokens, 0.0
    micro = max(cfg.train.global_batch_size // (b * layout.dp), 1)
    rank = p - 1 if last else 0
    chunks = in_flight_layers(cfg, layout, micro, rank=rank) * v / rank_layers(
        cfg.model.num_layers, layout, rank)
    held = (v - 1) * min(p, micro) if last else chunks
    received = (0 if last or recompute == "full" else 2) + (1 if v > 1 else 0)
    if first and v > 1:
        tokens += 8 * s * b * (chunks - min(p, micro))
    return tokens + held * residual, received * residual


def activation_peak_bytes(cfg: RunConfig, layout: Layout, b: int, recompute: str, *,
                          first: bool, last: bool) -> float:
    """Activation bytes of one rank at its forward/backward peak, the larger of two moments
    (both with the persistent score buffer): the loss, when the last stage holds its saved
    layers, the loss inputs and the logits transient; and a layer's backward, after the loss
    tensors of that micro-batch are freed, with ``backward_working_bytes`` on top. Both hold
    the cached RoPE frequencies (``rope_cache_bytes``) and ``schedule_bytes``' first part."""
    saved = saved_activation_bytes(cfg, layout, b, recompute, first=first, last=last)
    layers = saved_activation_bytes(cfg, layout, b, recompute, first=first, last=False)
    held, received = schedule_bytes(cfg, layout, b, recompute, first=first, last=last)
    backward = layers + backward_working_bytes(cfg, layout, b, recompute) + received
    loss = saved + loss_working_bytes(cfg, layout, b) if last else 0.0
    return (max(backward, loss) + held + score_buffer_bytes(cfg, layout, b)
            + rope_cache_bytes(cfg, layout, recompute))


def optimizer_step_bytes(cfg: RunConfig, layout: Layout, b: int, main_params: float) -> float:
    """Bytes beyond weights, gradients and optimizer state while the optimizer steps: the
    persistent score buffer, and torch's foreach AdamW temporary (``ADAM_TEMP_BYTES`` per main
    parameter, ``main_params`` of them on this rank) when the GPU runs the local spec. With
    Transformer Engine installed megatron uses its FusedAdam, which allocates none."""
    adam = ADAM_TEMP_BYTES * main_params if cfg.model.transformer_impl == "local" else 0.0
    return score_buffer_bytes(cfg, layout, b) + adam

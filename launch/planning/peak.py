"""The peak of a whole training step: forward, backward (recomputation included) and optimizer.

``memory.saved_activation_bytes`` counts what a rank keeps for backward. The step's peak is
higher: the backward pass of a layer holds its saved tensors *and* their gradients, a layer
recomputed in backward rebuilds its saved tensors first, the local spec keeps a persistent
buffer for the attention scores, and torch's AdamW allocates a temporary per parameter. Each of
these is a separate term below; ``activation_peak_bytes`` and ``optimizer_step_bytes`` combine
them for one rank. Notation as in memory.py.

How the terms were found: tests/unit/test_memory_peak.py runs real megatron-core steps on CPU
ranks under torch.profiler's allocator records (``tests/unit/megatron_step_memory.py``) and
reads the live-bytes timeline; the per-tensor sequences quoted below are from those records.
"""
from __future__ import annotations

from launch.schema import Layout, RunConfig
from launch.planning.flops import padded_vocab_size
from launch.planning.memory import (activation_element_bytes, layer_saved_bytes,
                                    saved_activation_bytes, scores_materialized)

SOFTMAX_BACKWARD_BYTES = 12
"""Bytes per score element while the local spec's attention softmax runs backward: its fp32
output (saved), the fp32 gradient of that output and the fp32 gradient of its input. The
e-byte probabilities megatron saved for the scores x V product are freed just before (their
node ran), so this is the same in bf16 and fp32 (CPU records: +2 +4 -2 +4 per e = 2 layer)."""
RERUN_SCORES_BYTES = 4
"""Measured only on GPU (shared/data/memory_h100_calibration.jsonl, every recompute row of the
local spec): one more fp32 score tensor is live while a recomputed attention runs backward
than the CPU records show. Cause not found (the CPU rerun of the same megatron code holds
none); modelled so that ``fits`` never trusts the lower CPU figure on a GPU."""
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
    s_kv = s * layout.cp if (m.transformer_impl == "local" and layout.cp > 1) else s
    return m.num_attention_heads / layout.tp * b * s * s_kv


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


def gathered_kv_bytes(cfg: RunConfig, layout: Layout, b: int) -> float:
    """K and V of all s tokens that the local spec's CP attention (megatron_ext/cp_attention.py)
    gathers again when a recomputed attention reruns: 2 h e / t per gathered token."""
    m = cfg.model
    if m.transformer_impl != "local" or layout.cp == 1:
        return 0.0
    e = activation_element_bytes(cfg.train.precision)
    return cfg.train.seq_length * b * 2 * m.hidden_size * e / layout.tp


def backward_working_bytes(cfg: RunConfig, layout: Layout, b: int, recompute: str) -> float:
    """Bytes live during one layer's backward beyond what the rank had saved.

    Without scores (TE's fused attention) the gradients of a layer are about the size of what
    it saved (``layer_saved_bytes(none)``). With scores the softmax backward dominates:
      none: the layer's saved scores become ``SOFTMAX_BACKWARD_BYTES`` per element;
      selective: core attention is rerun, so all of it is new, plus ``RERUN_SCORES_BYTES``
        (and, under CP on CPU, the K and V it gathers again);
      full: the group of ``recompute_num_layers`` layers is rerun (each saving its ``none``
        tensors again), and its last layer's softmax backward on top, plus the rerun terms.
    """
    layer = layer_saved_bytes(cfg, layout, b, "none")
    scores = score_elements(cfg, layout, b)
    chain = SOFTMAX_BACKWARD_BYTES * scores
    rerun = 0.0 if recompute == "none" else RERUN_SCORES_BYTES * scores + gathered_kv_bytes(
        cfg, layout, b)
    if recompute == "none":
        return max(layer, chain - saved_score_bytes(cfg, layout, b))
    if recompute == "selective":
        return max(layer, chain + rerun)
    group = cfg.train.recompute_num_layers * layer
    return group + max(0.0, chain - saved_score_bytes(cfg, layout, b)) + rerun


def loss_working_bytes(cfg: RunConfig, layout: Layout, b: int) -> float:
    """The last stage's e-byte logits live beside their fp32 copy while the loss is computed
    and again as their gradient (s b V e / t; none in fp32, where the copy is the logits)."""
    e = activation_element_bytes(cfg.train.precision)
    s, t = cfg.train.seq_length / layout.cp, layout.tp
    return s * b * padded_vocab_size(cfg.model, t) / t * (0 if e == 4 else e)


def activation_peak_bytes(cfg: RunConfig, layout: Layout, b: int, recompute: str, *,
                          first: bool, last: bool) -> float:
    """Activation bytes of one rank at its forward/backward peak, the larger of two moments
    (both with the persistent score buffer): the loss, when the last stage holds its saved
    layers, the loss inputs and the logits transient; and a layer's backward, after the loss
    tensors of that micro-batch are freed, with ``backward_working_bytes`` on top."""
    saved = saved_activation_bytes(cfg, layout, b, recompute, first=first, last=last)
    layers = saved_activation_bytes(cfg, layout, b, recompute, first=first, last=False)
    backward = layers + backward_working_bytes(cfg, layout, b, recompute)
    loss = saved + loss_working_bytes(cfg, layout, b) if last else 0.0
    return max(backward, loss) + score_buffer_bytes(cfg, layout, b)


def optimizer_step_bytes(cfg: RunConfig, layout: Layout, b: int, main_params: float) -> float:
    """Bytes beyond weights, gradients and optimizer state while the optimizer steps: the
    persistent score buffer, and torch's foreach AdamW temporary (``ADAM_TEMP_BYTES`` per main
    parameter, ``main_params`` of them on this rank) when the GPU runs the local spec. With
    Transformer Engine installed megatron uses its FusedAdam, which allocates none."""
    adam = ADAM_TEMP_BYTES * main_params if cfg.model.transformer_impl == "local" else 0.0
    return score_buffer_bytes(cfg, layout, b) + adam

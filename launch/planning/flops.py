"""Parameter and FLOP counts of the Llama architecture, shared by the planner and the MFU metric.

Pure arithmetic on ``ModelConfig``: GQA attention (``num_query_groups`` key/value heads), a
SwiGLU MLP (three matrices), RMSNorm (one weight vector), RoPE (no parameters) and no biases.
The W&B MFU metric and the planner's step-time model import ``flops_per_token`` from here so
a predicted and a measured MFU mean the same thing.
"""
from __future__ import annotations

import math

from launch.schema import ModelConfig

GPU_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}
"""Dense (no sparsity) bf16 tensor-core peak per GPU, from NVIDIA's data sheets."""


def padded_vocab_size(model: ModelConfig, tp: int) -> int:
    """Megatron's rule: embedding rows padded to a multiple of make_vocab_size_divisible_by*tp."""
    multiple = model.make_vocab_size_divisible_by * tp
    return math.ceil(model.vocab_size / multiple) * multiple


def kv_channels(model: ModelConfig) -> int:
    """Width of one attention head (``d``)."""
    return model.hidden_size // model.num_attention_heads


def layer_linear_params(model: ModelConfig) -> int:
    """Matrix weights of one layer: Q and O are h x h, K and V are h x (g*d), SwiGLU is 3 h x f."""
    h, f = model.hidden_size, model.ffn_hidden_size
    kv = model.num_query_groups * kv_channels(model)
    return h * (2 * h + 2 * kv) + 3 * h * f


def layer_params(model: ModelConfig) -> int:
    """One transformer layer: its matrices plus two RMSNorm weight vectors."""
    return layer_linear_params(model) + 2 * model.hidden_size


def param_count(model: ModelConfig, tp: int = 1) -> int:
    """All parameters: layers, final norm, embedding and (when untied) the output layer.

    The vocabulary is padded for ``tp`` as Megatron pads it, so this is what a TP=``tp`` run
    allocates in total (llama3_8b: 8.03e9 at tp=1).
    """
    embedding = padded_vocab_size(model, tp) * model.hidden_size
    embeddings = 2 * embedding if model.untie_embeddings_and_output_weights else embedding
    return model.num_layers * layer_params(model) + model.hidden_size + embeddings


def flops_per_token(model: ModelConfig, seq_length: int) -> float:
    """Model FLOPs of one trained token (forward + backward, no recomputation).

    6 * (L * layer matrices + h * V) for the matrix multiplies (2 per multiply-add, times 3 for
    forward + both backward products), plus 12 * L * h * s for the attention scores and their
    product with V. Causal masking is not discounted, as in Megatron-LM's and PaLM's MFU
    (Narayanan et al. 2021, Chowdhery et al. 2022), so numbers compare with published ones.
    """
    h, L = model.hidden_size, model.num_layers
    matmul = L * layer_linear_params(model) + h * model.vocab_size
    return 6.0 * matmul + 12.0 * L * h * seq_length


def mfu(tokens_per_s_per_gpu: float, model: ModelConfig, seq_length: int,
        gpu: str = "H100") -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the GPU's dense bf16 peak."""
    peak = GPU_PEAK_BF16_TFLOPS[gpu] * 1e12
    return tokens_per_s_per_gpu * flops_per_token(model, seq_length) / peak

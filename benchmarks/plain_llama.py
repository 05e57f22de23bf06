"""A Llama in plain PyTorch, the baseline of benchmarks/throughput.py.

The same shapes as megatron-core's GPTModel built from a ``ModelConfig`` (GQA attention with
rotate-half RoPE, SwiGLU, RMSNorm, no biases, padded vocabulary, tied or untied output), written
the way a minimal training script would: ``nn.Linear``, ``scaled_dot_product_attention``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from launch.schema import ModelConfig
from launch.planning.flops import padded_vocab_size


class Block(nn.Module):
    """Llama layer: RMSNorm, GQA attention with RoPE, RMSNorm, SwiGLU; no biases."""

    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        self.heads, self.groups = m.num_attention_heads, m.num_query_groups
        self.head_dim = m.hidden_size // m.num_attention_heads
        kv = self.groups * self.head_dim
        self.attn_norm = nn.RMSNorm(m.hidden_size, eps=m.norm_epsilon)
        self.qkv = nn.Linear(m.hidden_size, m.hidden_size + 2 * kv, bias=False)
        self.proj = nn.Linear(m.hidden_size, m.hidden_size, bias=False)
        self.mlp_norm = nn.RMSNorm(m.hidden_size, eps=m.norm_epsilon)
        self.fc1 = nn.Linear(m.hidden_size, 2 * m.ffn_hidden_size, bias=False)
        self.fc2 = nn.Linear(m.ffn_hidden_size, m.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        kv = self.groups * self.head_dim
        q, k, v = self.qkv(self.attn_norm(x)).split([h, kv, kv], dim=-1)
        q = _rope(q.view(b, s, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k = _rope(k.view(b, s, self.groups, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, s, self.groups, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, h))
        gate, up = self.fc1(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(gate) * up)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, megatron-core's default layout."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class PlainLlama(nn.Module):
    def __init__(self, m: ModelConfig, seq_length: int) -> None:
        super().__init__()
        vocab = padded_vocab_size(m, 1)
        self.embed = nn.Embedding(vocab, m.hidden_size)
        self.layers = nn.ModuleList(Block(m) for _ in range(m.num_layers))
        self.norm = nn.RMSNorm(m.hidden_size, eps=m.norm_epsilon)
        self.output = nn.Linear(m.hidden_size, vocab, bias=False)
        if not m.untie_embeddings_and_output_weights:
            self.output.weight = self.embed.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=m.init_method_std)
        head_dim = m.hidden_size // m.num_attention_heads
        inv_freq = 1.0 / m.rotary_base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(seq_length).float(), inv_freq).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        return self.output(self.norm(x))

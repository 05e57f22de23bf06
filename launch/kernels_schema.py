"""Which of megatron-core's fused kernels the model uses (the ``kernels`` section).

Stdlib only (part of the schema layer, re-exported by ``launch.schema``). The dataclass defaults
are megatron-core's own (all off); ``conf/recipe/nvidia.yaml``, which the GPU cluster profiles
select, turns on what NVIDIA's tuned H100 recipes turn on (NeMo's llama3 performance recipes,
github.com/NVIDIA/NeMo nemo/collections/llm/recipes/*: bias_activation_fusion, apply_rope_fusion,
cross_entropy_loss_fusion, gradient_accumulation_fusion, masked_softmax_fusion, and DDP
grad_reduce_in_fp32=False). What runs where:

- ``bias_activation_fusion`` (the SwiGLU MLP through megatron's fused ``bias_swiglu``, which keeps
  only fc1's output for backward) and ``cross_entropy_loss_fusion`` (megatron's native fused
  vocab-parallel cross entropy) are plain torch: they run on CPU ranks too, where the tests hold
  them to the unfused losses.
- ``apply_rope_fusion`` and ``gradient_accumulation_fusion`` are Transformer Engine kernels (the
  local spec's linear layers would need apex's ``fused_weight_gradient_mlp_cuda``), so they need
  the TE spec on GPU ranks; ``masked_softmax_fusion`` is the local spec's CUDA softmax (TE's
  attention has its own). On CPU ranks these three are off, with one log line per rank.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

CUDA_ONLY = ("apply_rope_fusion", "gradient_accumulation_fusion", "masked_softmax_fusion")
"""Kernels that exist only on GPUs: off on CPU ranks (``on_cpu_ranks``)."""
NEEDS_TE = ("apply_rope_fusion", "gradient_accumulation_fusion")
"""Kernels that only the Transformer Engine spec has (refused with model.transformer_impl=local on
GPU ranks)."""


@dataclass
class KernelsConfig:
    """megatron-core's fusions, by their ``TransformerConfig`` names."""

    bias_activation_fusion: bool = False
    """Fused SwiGLU (megatron's ``bias_swiglu_impl``): backward recomputes SiLU from fc1's output
    instead of keeping five f-wide tensors per token."""
    apply_rope_fusion: bool = False
    """Transformer Engine's fused RoPE kernel (needs the TE spec on GPU ranks)."""
    cross_entropy_loss_fusion: bool = False
    """megatron's fused vocab-parallel cross entropy (``cross_entropy_fusion_impl=native``)."""
    gradient_accumulation_fusion: bool = False
    """Weight gradients accumulated straight into the fp32/bf16 main-grad buffer by TE's GEMMs
    (needs the TE spec on GPU ranks)."""
    masked_softmax_fusion: bool = False
    """The local spec's fused causal softmax kernel on GPUs (the TE spec's attention is fused
    already; no effect there)."""

    def problems(self, *, local_spec_on_gpu: bool) -> list[str]:
        """What the layer spec cannot run: the TE-only kernels with the local spec on GPUs."""
        if not local_spec_on_gpu:
            return []
        return [f"kernels.{name}=true needs model.transformer_impl=transformer_engine on GPU "
                "ranks (the local spec has no such kernel); set it false"
                for name in NEEDS_TE if getattr(self, name)]

    def on_cpu_ranks(self) -> tuple["KernelsConfig", list[str]]:
        """The kernels CPU ranks run (the CUDA-only ones off) and the names turned off."""
        off = [name for name in CUDA_ONLY if getattr(self, name)]
        return dataclasses.replace(self, **dict.fromkeys(off, False)), off

"""Which of megatron-core's fused kernels the model uses (the ``kernels`` section).

Stdlib only (part of the schema layer, re-exported by ``launch.schema``). The dataclass defaults
are megatron-core's own (all off); ``conf/recipe/nvidia.yaml``, which the GPU cluster profiles
select, turns on what NVIDIA's tuned H100 recipes turn on (NeMo's llama3 performance recipes,
github.com/NVIDIA/NeMo nemo/collections/llm/recipes/*: bias_activation_fusion, apply_rope_fusion,
cross_entropy_loss_fusion, gradient_accumulation_fusion, masked_softmax_fusion, and DDP
grad_reduce_in_fp32=False). What runs where:

- ``bias_activation_fusion`` (the SwiGLU MLP through megatron's fused ``bias_swiglu``, which keeps
  only fc1's output for backward) is plain torch: it runs on CPU ranks too, where the tests hold
  it to the unfused losses (5e-7 apart over 8 steps, measured).
- ``cross_entropy_loss_fusion`` (megatron's native fused vocab-parallel cross entropy) is plain
  torch too, but megatron-core 0.16.1 rounds the logits' gradient to bf16 in it
  (fusions/fused_cross_entropy.py, ``calculate_gradients``): right for bf16 training, wrong for
  fp32 (measured on CPU fp32 ranks: the loss 1e-4 off the unfused one after 4 steps). So it is
  refused with train.precision=fp32 on GPU ranks and off on CPU ranks, which compute in fp32.
- ``apply_rope_fusion`` and ``gradient_accumulation_fusion`` are Transformer Engine kernels (the
  local spec's linear layers would need apex's ``fused_weight_gradient_mlp_cuda``), so they need
  the TE spec on GPU ranks; ``masked_softmax_fusion`` is the local spec's CUDA softmax (TE's
  attention has its own). On CPU ranks these three are off, with one log line per rank (naming the fused cross entropy too).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

CUDA_ONLY = ("apply_rope_fusion", "gradient_accumulation_fusion", "masked_softmax_fusion")
"""Kernels that exist only on GPUs: off on CPU ranks (``on_cpu_ranks``)."""
BF16_ONLY = ("cross_entropy_loss_fusion",)
"""Kernels whose gradients megatron rounds to bf16: not for fp32 training (CPU ranks drop them)."""
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

    def problems(self, *, local_spec_on_gpu: bool, fp32_on_gpu: bool) -> list[str]:
        """What GPU ranks cannot run: the TE-only kernels with the local spec, the bf16-gradient
        ones in fp32 training (CPU ranks drop them instead: ``on_cpu_ranks``)."""
        out = [f"kernels.{name}=true needs model.transformer_impl=transformer_engine on GPU "
               "ranks (the local spec has no such kernel); set it false"
               for name in NEEDS_TE if local_spec_on_gpu and getattr(self, name)]
        return out + [f"kernels.{name}=true needs train.precision=bf16 or fp8: megatron rounds "
                      "its gradient to bf16; set it false for fp32 training"
                      for name in BF16_ONLY if fp32_on_gpu and getattr(self, name)]

    def on_cpu_ranks(self) -> tuple["KernelsConfig", list[str]]:
        """The kernels CPU ranks run (the CUDA-only ones off) and the names turned off."""
        off = [name for name in CUDA_ONLY + BF16_ONLY if getattr(self, name)]
        return dataclasses.replace(self, **dict.fromkeys(off, False)), off

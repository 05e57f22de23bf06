"""Build megatron-core's GPTModel for one rank: the layout decides which shard it holds."""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.spec_utils import ModuleSpec

from launch.schema import KernelsConfig, Layout, ModelConfig, TrainConfig
from megatron_ext import parallel
from megatron_ext.cp_attention import ContextParallelDotProductAttention
from launch.planning.flops import padded_vocab_size

# Megatron scales the init of the two projections that write into the residual stream.
_RESIDUAL_OUTPUT_WEIGHTS = ("linear_proj.weight", "linear_fc2.weight")
NO_KERNELS = KernelsConfig()
log = logging.getLogger("megatron_ext.model")


def param_dtype(train: TrainConfig, use_gpu: bool) -> torch.dtype:
    """bf16 weights on GPU (fp32 master copies live in the optimizer); fp32 on CPU."""
    return torch.bfloat16 if use_gpu and train.precision in ("bf16", "fp8") else torch.float32


GPU_EXTENSIONS = {"gradient_accumulation_fusion": "fused_weight_gradient_mlp_cuda",
                  "masked_softmax_fusion": "scaled_upper_triang_masked_softmax_cuda"}
"""Compiled extensions (apex's, in NVIDIA's containers) megatron-core needs for these kernels on
GPU: the output layer is megatron's own ColumnParallelLinear even with the TE spec, and it
refuses gradient_accumulation_fusion without ``fused_weight_gradient_mlp_cuda``."""


def rank_kernels(kernels: KernelsConfig, use_gpu: bool) -> KernelsConfig:
    """The kernels this rank runs, and one log line naming any asked for but dropped: CPU ranks
    drop the CUDA-only ones; GPU ranks those whose compiled extension is not installed. So a
    rehearsal or an image without apex never differs silently from what was asked."""
    if use_gpu:
        off = [name for name, ext in GPU_EXTENSIONS.items()
               if getattr(kernels, name) and importlib.util.find_spec(ext) is None]
        kept, why = dataclasses.replace(kernels, **dict.fromkeys(off, False)), "extension missing"
    else:
        (kept, off), why = kernels.on_cpu_ranks(), ("CUDA-only kernels, or bf16 gradients fp32 "
                                                     "CPU ranks would not match; GPU ranks use them")
    if off:
        log.warning("this rank runs without %s (%s)",
                    ", ".join(f"kernels.{name}" for name in off), why)
    return kept


def pipeline_split(layout: Layout) -> dict:
    """megatron-core's uneven pipeline fields (``launch.parallel_schema``)."""
    return {"num_layers_in_first_pipeline_stage": layout.first_stage_layers,
            "num_layers_in_last_pipeline_stage": layout.last_stage_layers,
            "account_for_embedding_in_pipeline_split": layout.embedding_in_split,
            "account_for_loss_in_pipeline_split": layout.loss_in_split}


def transformer_config(model: ModelConfig, train: TrainConfig, layout: Layout,
                       use_gpu: bool, kernels: KernelsConfig = NO_KERNELS) -> TransformerConfig:
    """``kernels`` as the rank runs them (``rank_kernels``)."""
    dtype = param_dtype(train, use_gpu)
    recompute = {"none": {}, "selective": {"recompute_granularity": "selective"},
                 "full": {"recompute_granularity": "full", "recompute_method": "uniform",
                          "recompute_num_layers": train.recompute_num_layers}}[train.recompute]
    return TransformerConfig(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size, kv_channels=model.hidden_size // model.num_attention_heads,
        normalization="RMSNorm", layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=model.init_method_std,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        context_parallel_size=layout.cp, sequence_parallel=layout.sp,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp8="hybrid" if train.precision == "fp8" else None,
        use_cpu_initialization=not use_gpu, perform_initialization=True,
        calculate_per_token_loss=True,
        # Transformer Engine picks its kernel by this; the local spec has only its own.
        attention_backend=(AttnBackend[model.attention_backend] if uses_transformer_engine(
            model, use_gpu) else AttnBackend.local),
        cross_entropy_fusion_impl="native", **dataclasses.asdict(kernels), **pipeline_split(layout),
        **p2p_comm(layout), **recompute)


def p2p_comm(layout: Layout) -> dict[str, bool]:
    """Megatron-LM's rule (validate_args): the interleaved schedule overlaps its pipeline sends
    and receives, unbatched (``batch_p2p_comm = not overlap_p2p_comm``); the plain 1F1B batches
    them. At PP=2 a rank's previous and next stage are one peer, and batched, the interleaved
    schedule's tensors to and from it got mixed up: measured on CPU, PP=2 VPP=2 trained off the
    PP=2 loss from step 1 (6.249 vs 6.257) with no error; PP=4 VPP=2 stayed exact. The same on
    CPU and GPU, so the CPU tests (tests/integration/test_training.py) check what GPUs run."""
    interleaved = layout.vpp > 1
    return {"overlap_p2p_comm": interleaved, "batch_p2p_comm": not interleaved}


def _transformer_engine_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def uses_transformer_engine(model: ModelConfig, use_gpu: bool) -> bool:
    return use_gpu and model.transformer_impl == "transformer_engine"


def layer_spec(model: ModelConfig, use_gpu: bool, cp: int = 1) -> ModuleSpec:
    """Transformer Engine's fused spec on GPU; the local (plain torch) spec on CPU, whose
    attention gathers K and V over the CP group when ``cp > 1`` (a CPU rehearsal of TE's)."""
    if uses_transformer_engine(model, use_gpu):
        if not _transformer_engine_installed():
            raise RuntimeError("model.transformer_impl=transformer_engine but Transformer Engine "
                               "is not installed on this GPU node: pip install -e '.[gpu]', or "
                               "set model.transformer_impl=local (much slower)")
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if cp > 1 and not use_gpu:  # on GPUs megatron's local attention refuses CP (validate)
        spec.submodules.self_attention.submodules.core_attention = (
            ContextParallelDotProductAttention)
    return spec


def build_model(model: ModelConfig, train: TrainConfig, layout: Layout, use_gpu: bool,
                vocab_rows: int | None = None, kernels: KernelsConfig = NO_KERNELS
                ) -> tuple[list[GPTModel], TransformerConfig]:
    """This rank's model chunks: one per virtual pipeline stage it hosts. ``vocab_rows``: the
    embedding's rows (a resume keeps its checkpoint's); None pads ``model.vocab_size`` for TP."""
    config = transformer_config(model, train, layout, use_gpu, rank_kernels(kernels, use_gpu))
    spec = layer_spec(model, use_gpu, layout.cp)
    chunks = []
    for vp_stage in range(layout.vpp) if layout.vpp > 1 else [None]:
        chunk = GPTModel(
            config=config, transformer_layer_spec=spec,
            vocab_size=vocab_rows or padded_vocab_size(model, layout.tp),
            max_sequence_length=model.max_position_embeddings,
            pre_process=parallel.is_first_stage(vp_stage),
            post_process=parallel.is_last_stage(vp_stage),
            share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
            position_embedding_type="rope", rotary_base=model.rotary_base,
            rope_scaling=model.rope_scaling_factor > 0,
            rope_scaling_factor=model.rope_scaling_factor or 8.0, vp_stage=vp_stage)
        chunks.append(chunk.cuda() if use_gpu else chunk)
    return chunks, config


def _weight_std(key: str, model: ModelConfig) -> float:
    if key.endswith(_RESIDUAL_OUTPUT_WEIGHTS):
        return model.init_method_std / math.sqrt(2.0 * model.num_layers)
    return model.init_method_std


def weight_shards(chunk: GPTModel) -> list[ShardedTensor]:
    """This rank's tensors with their global names and offsets, whatever the layout."""
    out: list[ShardedTensor] = []
    for item in nested_values(chunk.sharded_state_dict()):
        if isinstance(item, ShardedTensorFactory):
            out += [t for t in nested_values(item.build()) if isinstance(t, ShardedTensor)]
        elif isinstance(item, ShardedTensor):
            out.append(item)
    return out


@torch.no_grad()
def init_layout_independent(chunks: list[GPTModel], model: ModelConfig, seed: int) -> None:
    """Re-draw every weight matrix from a generator keyed by its global name and layer.

    Megatron's own init depends on the layout (each pipeline stage draws only its layers),
    so TP=2, PP=2 and DP=2 would start from different models. Here each global matrix is
    drawn whole and this rank keeps its slice, so every layout starts from the same model.
    It materialises one full matrix at a time on the CPU: meant for small and medium models.
    """
    for chunk in chunks:
        for shard in weight_shards(chunk):
            if shard.data.dim() < 2:  # norm weights keep megatron's init (ones)
                continue
            layer = shard.global_offset[: shard.prepend_axis_num]
            key_seed = zlib.crc32(f"{shard.key}{layer}".encode()) ^ seed
            generator = torch.Generator().manual_seed(key_seed)
            full_shape = shard.global_shape[shard.prepend_axis_num:]
            full = torch.randn(full_shape, generator=generator) * _weight_std(shard.key, model)
            offsets = shard.global_offset[shard.prepend_axis_num:]
            index = tuple(slice(o, o + n) for o, n in zip(offsets, shard.local_shape))
            shard.data.copy_(full[index].to(shard.data.dtype))

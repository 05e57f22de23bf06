"""What the run config tells megatron-core's TransformerConfig (built without a GPU)."""
from __future__ import annotations

import pytest
from megatron.core.transformer.enums import AttnBackend

from launch.schema import Layout
from megatron_ext.model import transformer_config
from tests.conftest import make_config

LAYOUT = Layout(tp=1, pp=1, cp=1, dp=1)


@pytest.mark.parametrize("backend", ["flash", "fused", "unfused"])
def test_attention_backend_reaches_transformer_engine(backend: str) -> None:
    cfg = make_config(f"model.attention_backend={backend}")
    gpu = transformer_config(cfg.model, cfg.train, LAYOUT, use_gpu=True)
    assert gpu.attention_backend == AttnBackend[backend] and gpu.bf16
    cpu = transformer_config(cfg.model, cfg.train, LAYOUT, use_gpu=False)
    assert cpu.attention_backend == AttnBackend.local and not cpu.bf16  # CPU: local spec, fp32


def test_the_local_spec_on_gpu_uses_its_own_attention() -> None:
    cfg = make_config("model.transformer_impl=local")
    gpu = transformer_config(cfg.model, cfg.train, LAYOUT, use_gpu=True)
    assert gpu.attention_backend == AttnBackend.local


def test_the_recipe_s_kernels_reach_megatron_and_cpu_ranks_drop_the_cuda_only_ones(
        caplog: pytest.LogCaptureFixture) -> None:
    """GPU ranks get every kernel asked for whose extension is installed (RoPE fusion needs TE,
    absent here, so it is off in this check); CPU ranks run fused SwiGLU only and name the rest
    in one log line."""
    import dataclasses

    from megatron_ext.model import rank_kernels

    cfg = make_config("recipe=nvidia")
    with caplog.at_level("WARNING", logger="megatron_ext.model"):
        gpu = rank_kernels(dataclasses.replace(cfg.kernels, apply_rope_fusion=False), use_gpu=True)
    # no apex here: the kernels needing its compiled extensions are dropped, and said so
    assert not gpu.gradient_accumulation_fusion and not gpu.masked_softmax_fusion
    assert len(caplog.records) == 1 and "extension missing" in caplog.text
    config = transformer_config(cfg.model, cfg.train, LAYOUT, use_gpu=True, kernels=gpu)
    assert config.bias_activation_fusion and config.cross_entropy_loss_fusion
    assert config.cross_entropy_fusion_impl == "native"
    caplog.clear()
    with caplog.at_level("WARNING", logger="megatron_ext.model"):
        cpu = rank_kernels(cfg.kernels, use_gpu=False)
    assert dataclasses.asdict(cpu) == {
        "bias_activation_fusion": True, "apply_rope_fusion": False,
        "cross_entropy_loss_fusion": False, "gradient_accumulation_fusion": False,
        "masked_softmax_fusion": False}
    assert len(caplog.records) == 1 and "kernels.apply_rope_fusion" in caplog.text


def test_uneven_stages_and_bf16_gradients_reach_megatron() -> None:
    from megatron_ext.optim import ddp_config

    cfg = make_config("model.num_layers=6", "cluster.gpus_per_node=2", "parallel=pp2",
                      "parallel.num_layers_in_first_pipeline_stage=4", "recipe=nvidia")
    from launch.config import derive_layout
    config = transformer_config(cfg.model, cfg.train, derive_layout(cfg), use_gpu=False)
    assert (config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage) \
        == (4, None)
    assert not ddp_config(cfg).grad_reduce_in_fp32

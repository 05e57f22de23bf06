"""Uneven pipeline stages: megatron-core's split, the login node's checks, the planner's search."""
from __future__ import annotations

import pytest

from launch.config import derive_layout, validate
from launch.planning.memory import predict
from launch.planning.planner import plan
from launch.schema import Layout, stage_layers
from megatron_ext.model import transformer_config
from tests.conftest import make_config

LLAMA_405B = ("model.num_layers=126", "model.hidden_size=16384", "model.num_attention_heads=128",
              "model.num_query_groups=8", "model.ffn_hidden_size=53248", "model.vocab_size=128256",
              "model.max_position_embeddings=131072", "model.rope_scaling_factor=8.0")


@pytest.mark.parametrize("split,want", [
    ({"first_stage_layers": 3}, [[3], [1]]),
    ({"embedding_in_split": True, "loss_in_split": True}, [[2], [2]]),
    ({"embedding_in_split": True}, None),  # 4 + 1 does not split over 2
])
def test_the_split_is_megatron_cores(split: dict, want) -> None:
    """Our layer counts per stage are those megatron-core builds from the same fields."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    cfg = make_config("model.num_layers=4", "cluster.gpus_per_node=2", "parallel=pp2")
    layout = Layout(tp=1, pp=2, cp=1, dp=1, **split)
    problems = validate(cfg, layout)
    if want is None:
        assert any("cannot be split this way" in p for p in problems), problems
        return
    assert problems == [] and stage_layers(4, layout) == want
    config = transformer_config(cfg.model, cfg.train, layout, use_gpu=False)
    assert [[get_num_layers_to_build(config, pp_rank=r)] for r in range(2)] == want


def test_fields_reach_the_layout_and_bad_ones_are_named() -> None:
    cfg = make_config("model.num_layers=6", "cluster.gpus_per_node=2", "parallel=pp2",
                      "parallel.num_layers_in_first_pipeline_stage=4")
    assert derive_layout(cfg).first_stage_layers == 4 and validate(cfg) == []
    both = make_config("parallel=pp2", "parallel.num_layers_in_last_pipeline_stage=1",
                       "parallel.account_for_loss_in_pipeline_split=true")
    assert any("cannot be combined" in p for p in validate(both))
    odd = make_config("parallel=pp2", "parallel.vpp=2", "parallel.num_layers_in_first_pipeline_stage=3")
    assert any("num_layers_in_first_pipeline_stage=3 must be > 0, divisible by parallel.vpp=2" in p
               for p in validate(odd))


def test_405b_runs_at_pp8_with_the_embedding_and_loss_counted() -> None:
    """126 layers at PP=8 were refused ("must be divisible"); megatron's split takes them as
    NVIDIA does, 16 per stage counting the embedding and the loss, and the planner finds it."""
    cfg = make_config(*LLAMA_405B, "cluster=hyperpod_p5", "cluster.nodes=64", "train=pretrain",
                      "train.global_batch_size=2048", "parallel.pp=8", "parallel.tp=8",
                      "parallel.cp=2", "parallel.vpp=8")
    candidates = plan(cfg, {"tp": 8, "pp": 8, "cp": 2, "vpp": 8})
    layouts = [c.layout for c in candidates]
    assert layouts and all(layout.embedding_in_split and layout.loss_in_split for layout in layouts)
    assert stage_layers(126, layouts[0])[0] == [1] + [2] * 7  # the embedding takes a layer's place
    # NVIDIA's H100 bf16 recipe runs this layout without recompute (Megatron-Bridge
    # llama31_405b H100_BF16 preset: TP8 PP8 CP2 VP8, no recompute_num_layers): so does the plan.
    best = candidates[0]
    assert best.recompute == "none"
    first = predict(cfg, best.layout, micro_batch_size=best.micro_batch_size, recompute=best.recompute)
    assert first.fits and first.required_gib == pytest.approx(best.required_gib)


def test_bf16_gradients_halve_the_gradient_buffer() -> None:
    """optimizer.grad_reduce_in_fp32=false keeps DDP's buffer in bf16: 2 bytes per parameter."""
    fp32 = make_config("model=llama3_8b", "cluster=slurm", "train=pretrain", "parallel.auto=false")
    bf16 = make_config("model=llama3_8b", "cluster=slurm", "train=pretrain", "parallel.auto=false",
                       "optimizer.grad_reduce_in_fp32=false")
    layout = Layout(tp=1, pp=1, cp=1, dp=8)
    assert predict(bf16, layout).gradients_gib == pytest.approx(predict(fp32, layout).gradients_gib / 2)

"""The planner's step-time model against NVIDIA's published H100 results (Llama 3.1 8B, bf16).

Source of every row: shared/data/published_h100.md (github.com/NVIDIA/dgxc-benchmarking, Llama 3.1
8B "Expected Performance", releases v24.11.1 and v25.04.01; DGX H100, InfiniBand 400 Gb/s per
GPU = ``cluster=slurm``'s fabric; no recompute). NVIDIA ran its tuned recipe, which
``conf/recipe/nvidia.yaml`` reproduces.
"""
from __future__ import annotations

import pytest

from launch.planning.planner import Hardware, TUNED_FRACTION, step_time, tuned_recipe
from launch.schema import Layout
from tests.conftest import make_config

PUBLISHED = [  # (release, GPUs, measured s/step) at TP1 PP1 CP2, seq 8192, MBS 1, GBS 16/GPU
    ("v24.11.1", 8, 12.91), ("v24.11.1", 32, 13.05), ("v24.11.1", 128, 13.10),
    ("v25.04.01", 8, 12.27), ("v25.04.01", 128, 12.33),
]


def _nvidia_8b(gpus: int, *extra: str):
    return make_config("model=llama3_8b", "cluster=slurm", f"cluster.nodes={gpus // 8}",
                       "train=pretrain", f"train.global_batch_size={16 * gpus}",
                       "train.recompute=none", "parallel.auto=false", "parallel.cp=2",
                       "recipe=nvidia", *extra)


@pytest.mark.parametrize("release,gpus,measured", PUBLISHED,
                         ids=[f"{r}-{g}gpus" for r, g, _ in PUBLISHED])
def test_published_8b_rows_are_predicted_within_15_percent(release: str, gpus: int,
                                                          measured: float) -> None:
    cfg = _nvidia_8b(gpus)
    predicted = step_time(cfg, Layout(tp=1, pp=1, cp=2, dp=gpus // 2), 1, "none")
    assert abs(predicted / measured - 1) < 0.15, (release, gpus, predicted, measured)


def test_the_tuned_rate_applies_only_to_the_tuned_recipe() -> None:
    """Without the fusions (and the bf16 reduction) the model keeps the untuned measured rate,
    and the same layout is predicted slower."""
    tuned, plain = _nvidia_8b(8), _nvidia_8b(8, "recipe=plain")
    assert tuned_recipe(tuned) and not tuned_recipe(plain)
    assert Hardware.for_config(tuned).achieved_fraction == TUNED_FRACTION
    layout = Layout(tp=1, pp=1, cp=2, dp=4)
    assert step_time(plain, layout, 1, "none") > 1.3 * step_time(tuned, layout, 1, "none")

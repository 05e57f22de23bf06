"""Step metrics: the same FLOPs formula as the planner, MFU against the configured GPU."""
from __future__ import annotations

import pytest

from megatron_ext.throughput import Throughput, peak_memory
from tests.conftest import make_config
from launch.planning.flops import flops_per_token


def test_mfu_is_model_flops_per_gpu_over_the_configured_gpu_s_peak():
    cfg = make_config("model=llama3_8b", "cluster=pcs_p4d", "train.seq_length=4096")
    gpu = Throughput.from_config(cfg, world_size=8, use_gpu=True)
    values = gpu.values(tokens=8 * 4096, step_s=2.0, consumed_samples=80)
    per_gpu = 8 * 4096 / 2.0 / 8
    assert values["tokens_per_s_per_gpu"] == per_gpu
    tflops = per_gpu * flops_per_token(cfg.model, 4096) / 1e12
    assert values["tflops_per_s_per_gpu"] == pytest.approx(tflops)
    assert values["mfu"] == pytest.approx(tflops / 312.0)  # p4d: A100, 312 dense bf16 TFLOP/s
    assert values["consumed_tokens"] == 80 * 4096


def test_cpu_ranks_report_no_mfu_and_their_resident_memory():
    cpu = Throughput.from_config(make_config(), world_size=2, use_gpu=False)
    assert "mfu" not in cpu.values(tokens=2048, step_s=0.2, consumed_samples=16)
    assert 0 < peak_memory(use_gpu=False)["peak_rss_gib"] < 64

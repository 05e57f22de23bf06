"""The memory predictor: parameter counts against the published models, and each term's rule."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from launch.schema import Layout, RunConfig
from tests.conftest import REPO, make_config
from tools.flops import flops_per_token, mfu, param_count
from tools.memory import (
    GIB,
    MemoryBreakdown,
    in_flight_layers,
    layer_activation_bytes,
    predict,
    state_bytes,
)

SLURM_256 = ("train=pretrain", "cluster.kind=slurm", "cluster.nodes=32", "cluster.gpus_per_node=8")


def _replace(cfg: RunConfig, section: str, **changes) -> RunConfig:
    changed = dataclasses.replace(getattr(cfg, section), **changes)
    return dataclasses.replace(cfg, **{section: changed})


@pytest.mark.parametrize("model,params", [
    ("llama3_1b", 1_235_814_400),    # meta-llama/Llama-3.2-1B, tied embeddings
    ("llama3_8b", 8_030_261_248),    # meta-llama/Llama-3.1-8B
    ("llama3_70b", 70_553_706_496),  # meta-llama/Llama-3.1-70B
])
def test_parameter_count_matches_the_published_model(model: str, params: int) -> None:
    assert param_count(make_config(f"model={model}").model) == params


def test_terms_sum_to_the_peak() -> None:
    m = predict(make_config("model=llama3_8b", *SLURM_256), Layout(tp=2, pp=2, cp=1, dp=64))
    assert m.peak_gib == pytest.approx(m.weights_gib + m.gradients_gib + m.optimizer_gib
                                       + m.activations_gib + m.overhead_gib)
    assert m.fits == (m.peak_gib <= m.limit_gib) and m.limit_gib < 80


def test_bytes_per_parameter_follow_megatrons_report() -> None:
    """6 + 12/DP bytes per parameter with the distributed optimizer, 18 without (fp32 grads)."""
    cfg = make_config("model=llama3_8b", *SLURM_256)
    layout = Layout(tp=1, pp=1, cp=1, dp=256)
    params = param_count(cfg.model)
    assert sum(state_bytes(cfg, layout, first=True, last=True)) / params == \
        pytest.approx(6 + 12 / 256)
    plain = _replace(cfg, "optimizer", distributed=False)
    assert sum(state_bytes(plain, layout, first=True, last=True)) / params == pytest.approx(18)


def test_distributed_optimizer_divides_optimizer_state_by_exactly_dp() -> None:
    cfg = make_config("model=llama3_8b", *SLURM_256)
    for dp in (2, 8, 64):
        layout = Layout(tp=4, pp=256 // (4 * dp), cp=1, dp=dp)
        sharded = predict(cfg, layout).optimizer_gib
        whole = predict(_replace(cfg, "optimizer", distributed=False), layout).optimizer_gib
        assert whole / sharded == pytest.approx(dp)


def test_tensor_parallelism_halves_the_weights() -> None:
    cfg = make_config("model=llama3_8b", *SLURM_256)
    one = predict(cfg, Layout(tp=1, pp=1, cp=1, dp=256)).weights_gib
    two = predict(cfg, Layout(tp=2, pp=1, cp=1, dp=128)).weights_gib
    assert two / one == pytest.approx(0.5, abs=1e-3)  # only RMSNorm weights are replicated


def test_fp32_doubles_weights_and_untied_embeddings_add_a_table() -> None:
    cfg = make_config("model=llama3_8b", *SLURM_256)
    layout = Layout(tp=1, pp=1, cp=1, dp=256)
    bf16 = predict(cfg, layout).weights_gib
    assert predict(_replace(cfg, "train", precision="fp32"), layout).weights_gib == \
        pytest.approx(2 * bf16)
    tied = predict(_replace(cfg, "model", untie_embeddings_and_output_weights=False), layout)
    table = 128256 * 4096 * 2 / GIB
    assert bf16 - tied.weights_gib == pytest.approx(table)


def test_recomputation_shrinks_activations() -> None:
    """Full keeps one input per layer; selective only drops unfused attention's s^2 scores."""
    cfg = make_config("model=llama3_8b", *SLURM_256)
    layout = Layout(tp=2, pp=2, cp=1, dp=64, sp=True)
    none, selective, full = (predict(cfg, layout, recompute=r).activations_gib
                             for r in ("none", "selective", "full"))
    assert full < none / 4 and selective == pytest.approx(none)
    unfused = _replace(cfg, "model", attention_backend="unfused")
    assert predict(unfused, layout, recompute="selective").activations_gib < \
        predict(unfused, layout, recompute="none").activations_gib / 4


def test_unfused_attention_adds_the_square_scores() -> None:
    """Korthikanti et al.: 5 a s^2 b bytes per layer, split over TP."""
    cfg = make_config("model=llama3_8b", *SLURM_256)
    layout = Layout(tp=2, pp=1, cp=1, dp=128, sp=True)
    unfused = _replace(cfg, "model", attention_backend="unfused")
    extra = layer_activation_bytes(unfused, layout, 1) - layer_activation_bytes(cfg, layout, 1)
    assert extra == pytest.approx(5 * 32 * 8192**2 / 2)


def test_sequence_and_context_parallelism_split_activations() -> None:
    cfg = make_config("model=llama3_8b", *SLURM_256)
    per_layer = layer_activation_bytes(cfg, Layout(tp=1, pp=1, cp=1, dp=256), 1)
    assert layer_activation_bytes(cfg, Layout(tp=4, pp=1, cp=1, dp=64, sp=True), 1) == \
        pytest.approx(per_layer / 4)
    assert layer_activation_bytes(cfg, Layout(tp=1, pp=1, cp=2, dp=128), 1) == \
        pytest.approx(per_layer / 2)
    assert layer_activation_bytes(cfg, Layout(tp=4, pp=1, cp=1, dp=64, sp=False), 1) > \
        per_layer / 4


def test_in_flight_micro_batches_of_the_pipeline_schedules() -> None:
    cfg = make_config("model=llama3_70b", *SLURM_256)
    plain = Layout(tp=8, pp=4, cp=1, dp=8)
    assert in_flight_layers(cfg, plain, 128, rank=0) == 80          # p micro-batches x L/p
    assert in_flight_layers(cfg, plain, 128, rank=3) == 20          # last stage: one
    assert in_flight_layers(cfg, plain, 2, rank=0) == 40            # capped by m
    interleaved = dataclasses.replace(plain, vpp=5)                  # Megatron: L (1 + (p-1)/(p v))
    assert in_flight_layers(cfg, interleaved, 128, rank=0) == pytest.approx(80 * (1 + 3 / 20))


def test_micro_batch_size_scales_activations() -> None:
    cfg = make_config("model=llama3_8b", *SLURM_256)
    layout = Layout(tp=2, pp=2, cp=1, dp=64, sp=True)
    one = predict(cfg, layout, micro_batch_size=1).activations_gib
    assert predict(cfg, layout, micro_batch_size=4).activations_gib == pytest.approx(4 * one)


def test_70b_does_not_fit_one_node_but_fits_256_gpus() -> None:
    one_node = make_config("model=llama3_70b", "train=pretrain", "cluster.gpus_per_node=8")
    assert not predict(one_node, Layout(tp=8, pp=1, cp=1, dp=1, sp=True),
                       micro_batch_size=1, recompute="full").fits
    many = make_config("model=llama3_70b", *SLURM_256)
    assert predict(many, Layout(tp=8, pp=4, cp=1, dp=8, vpp=5, sp=True),
                   micro_batch_size=1, recompute="selective").fits


def test_last_stage_can_be_the_worst_rank() -> None:
    """Full recompute leaves little on the first stage; the last keeps fp32 logits over V/t."""
    cfg = make_config("model=llama3_8b", *SLURM_256, "train.micro_batch_size=4")
    memory = predict(cfg, Layout(tp=1, pp=8, cp=1, dp=32), recompute="full")
    assert memory.stage == "last"


def test_flops_per_token_and_mfu() -> None:
    model = make_config("model=llama3_8b").model
    norms = (2 * 32 + 1) * 4096  # RMSNorm weights multiply nothing
    dense = 6 * (param_count(model) - 128256 * 4096 - norms)  # the input embedding is a lookup
    assert flops_per_token(model, 8192) == dense + 12 * 32 * 4096 * 8192
    assert mfu(989e12 / flops_per_token(model, 8192), model, 8192) == pytest.approx(1.0)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.memory", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_json_cli_prints_one_object_with_the_documented_keys() -> None:
    run = _cli("--json", "model=llama3_70b", *SLURM_256, "parallel.tp=8", "parallel.pp=4")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    terms = {f.name for f in dataclasses.fields(MemoryBreakdown)}
    assert {"peak_gib", "fits", *terms} <= set(out)
    assert isinstance(out["fits"], bool) and out["peak_gib"] > 10


def test_table_cli_and_a_bad_override() -> None:
    run = _cli("model=llama3_8b")
    assert run.returncode == 0 and "peak" in run.stdout and "activations" in run.stdout
    bad = _cli("train.seq_lenght=4")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "train.seq_lenght" in bad.stderr

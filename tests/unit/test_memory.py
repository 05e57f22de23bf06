"""The memory predictor: parameter counts against the published models, and each term's rule."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from launch.schema import Layout, RunConfig
from tests.conftest import REPO, make_config
from launch.planning.flops import flops_per_token, mfu, param_count
from launch.planning.memory import (
    GIB,
    MemoryBreakdown,
    activation_bytes,
    in_flight_layers,
    layer_saved_bytes,
    predict,
    saved_activation_bytes,
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
    assert m.allocated_gib == pytest.approx(m.weights_gib + m.gradients_gib + m.optimizer_gib
                                            + m.activations_gib + m.workspace_gib)
    assert m.reserved_gib == pytest.approx(m.allocated_gib + m.fragmentation_gib)
    assert m.peak_gib == m.allocated_gib  # the documented interface: peak allocated
    assert m.required_gib == pytest.approx(m.reserved_gib + m.context_gib)
    assert m.fits == (m.required_gib <= m.limit_gib) and m.limit_gib < 80


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


def test_recomputation_and_flash_attention() -> None:
    """Full keeps one input per layer. With flash attention selective recomputation saves
    nothing: megatron's checkpoint keeps Q, K and (through V's view) the whole fused QKV output,
    more than TE keeps itself. With unfused attention it drops the s^2 scores."""
    cfg = make_config("model=llama3_8b", *SLURM_256)
    layout = Layout(tp=2, pp=2, cp=1, dp=64, sp=True)
    none, selective, full = (predict(cfg, layout, recompute=r).activations_gib
                             for r in ("none", "selective", "full"))
    assert full < none / 4 and none < selective < 1.1 * none
    unfused = _replace(cfg, "model", attention_backend="unfused")
    assert predict(unfused, layout, recompute="selective").activations_gib < \
        predict(unfused, layout, recompute="none").activations_gib / 4


def test_unfused_attention_adds_the_square_scores() -> None:
    """fp32 softmax output and its bf16 cast, a s^2 b (4 + 2) / t, and the s x s bool mask,
    instead of flash attention's fp32 softmax statistics (4 a s b / t)."""
    cfg = make_config("model=llama3_8b", *SLURM_256)
    layout = Layout(tp=2, pp=1, cp=1, dp=128, sp=True)
    unfused = _replace(cfg, "model", attention_backend="unfused")
    flash = layer_saved_bytes(cfg, layout, 1, "none")
    extra = layer_saved_bytes(unfused, layout, 1, "none") - flash
    s, a = 8192, 32
    assert extra == pytest.approx(6 * a * s**2 / 2 + s**2 - 4 * a * s / 2)


def test_sequence_and_context_parallelism_split_activations() -> None:
    """Everything per token splits over TP with SP (without it the norms are replicated) and
    over CP; RoPE's cos/sin tables (4 s d e per layer) do not depend on TP."""
    cfg = make_config("model=llama3_8b", *SLURM_256)
    rope = 4 * 8192 * 128 * 2
    per_layer = layer_saved_bytes(cfg, Layout(tp=1, pp=1, cp=1, dp=256), 1, "none")
    sp = layer_saved_bytes(cfg, Layout(tp=4, pp=1, cp=1, dp=64, sp=True), 1, "none")
    assert sp == pytest.approx((per_layer - rope) / 4 + rope)
    assert layer_saved_bytes(cfg, Layout(tp=1, pp=1, cp=2, dp=128), 1, "none") == \
        pytest.approx(per_layer / 2)
    assert layer_saved_bytes(cfg, Layout(tp=4, pp=1, cp=1, dp=64, sp=False), 1, "none") > sp


def test_fp32_activations_take_twice_the_bytes_of_bf16() -> None:
    cfg = make_config("model=llama3_8b", *SLURM_256)
    layout = Layout(tp=1, pp=1, cp=1, dp=256)
    bf16 = layer_saved_bytes(cfg, layout, 1, "none")
    fp32 = layer_saved_bytes(_replace(cfg, "train", precision="fp32"), layout, 1, "none")
    assert 1.98 < fp32 / bf16 < 2  # fp32 rsigma and softmax statistics are fp32 in both


def test_last_stage_adds_the_loss_inputs_and_the_logits_transient() -> None:
    """fp32 logits (4 V / t), int64 targets and a bool mask per token stay for backward; the
    bf16 logits (2 V / t) exist beside them only while the loss and its gradient are computed."""
    cfg = make_config("model=llama3_8b", *SLURM_256, "train.micro_batch_size=1")
    layout = Layout(tp=1, pp=2, cp=1, dp=128)
    saved = saved_activation_bytes(cfg, layout, 1, "full", first=False, last=True)
    middle = saved_activation_bytes(cfg, layout, 1, "full", first=False, last=False)
    final_norm = 2 * 4096 * 2 + 4
    assert saved - middle == pytest.approx(8192 * (final_norm + 4 * 128256 + 9))
    peak = activation_bytes(cfg, layout, 1, "full", first=False, last=True)
    assert peak - saved == pytest.approx(8192 * 2 * 128256)  # larger than one layer's working set


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
    four = predict(cfg, layout, micro_batch_size=4).activations_gib
    assert four == pytest.approx(4 * one, rel=0.01) and four < 4 * one  # RoPE tables: per sequence


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


def test_cli_takes_a_given_layout_under_a_gpu_profile_s_parallel_auto() -> None:
    """The profiles default to parallel=auto; parallel.* on the command line is the layout."""
    run = _cli("--json", "model=llama3_70b", "cluster=hyperpod_p5", "cluster.nodes=32",
               "parallel.tp=8", "parallel.pp=4", "train=pretrain")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["layout"] == {
        "tp": 8, "pp": 4, "cp": 1, "dp": 8, "vpp": 1, "sp": False, "first_stage_layers": None,
        "last_stage_layers": None, "embedding_in_split": False, "loss_in_split": False}
    refused = _cli("cluster=hyperpod_p5")
    assert refused.returncode == 2 and "needs an explicit layout" in refused.stderr


def test_table_cli_and_a_bad_override() -> None:
    run = _cli("model=llama3_8b")
    assert run.returncode == 0 and "peak" in run.stdout and "activations" in run.stdout
    bad = _cli("train.seq_lenght=4")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "train.seq_lenght" in bad.stderr


@pytest.mark.parametrize("tool", ["tools.memory", "tools.planner"])
def test_the_command_lines_answer_help_and_refuse_unknown_options(tool: str) -> None:
    """``--help`` used to end in Hydra's "LexerNoViableAltException: --help"."""
    helped = subprocess.run([sys.executable, "-m", tool, "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(f"usage: python -m {tool} [--json]") and "--json" in helped.stdout
    wrong = subprocess.run([sys.executable, "-m", tool, "--jsn"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == "error: unknown option --jsn; the options are --json and --help"

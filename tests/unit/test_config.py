"""Every invalid config is refused before anything starts, naming the field and the fix."""
from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
from pathlib import Path

import pytest

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from launch.config import CONF_DIR, derive_layout, register_schema, to_run_config, validate
from launch.prepare import for_sweep_point
from launch.schema import Layout
from tests.conftest import make_config, run_launch

# (overrides, a fragment the message must contain)
BAD_CONFIGS = [
    (["parallel.tp=4"], "tp*pp*cp*dp"),
    (["model=llama3_8b", "cluster.gpus_per_node=3", "parallel.tp=3"], "model.num_attention_heads"),
    (["model.num_query_groups=3", "model.num_attention_heads=6", "model.hidden_size=120",
      "parallel=tp2"], "model.num_query_groups"),
    (["model.num_layers=3", "parallel=pp2"], "model.num_layers=3"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size=10"),
    (["parallel.sp=true"], "parallel.sp=true needs parallel.tp > 1"),
    (["parallel=tp2", "parallel.sp=true", "model.transformer_impl=local"], "transformer_impl"),
    (["train.precision=fp16"], "train.precision='fp16'"),
    (["train.recompute=some"], "train.recompute='some'"),
    (["model.attention_backend=xformers"], "model.attention_backend"),
    (["parallel.vpp=2"], "parallel.vpp=2 needs parallel.pp > 1"),
    (["train.seq_length=4096"], "model.max_position_embeddings"),
    (["train.warmup_steps=300"], "train.warmup_steps=300"),
    (["cluster.nodes=2"], "cluster.kind=local"),
    (["parallel.cp=2", "train.seq_length=130"], "train.seq_length=130"),
    (["parallel.cp=2", "parallel.dp=1", "model.transformer_impl=local"],
     "parallel.cp=2 needs model.transformer_impl=transformer_engine"),
    (["parallel.cp=2", "parallel.dp=1", "model.attention_backend=unfused"],
     "parallel.cp=2 needs model.attention_backend=fused or flash"),
    (["cluster=hyperpod_p5", "cluster.nodes=2", "parallel.auto=false", "parallel.tp=8",
      "parallel.pp=1", "parallel.cp=2", "parallel.dp=1", "parallel.sp=true", "train.seq_length=8"],
     "train.seq_length/parallel.cp = 4 must be divisible by parallel.tp=8"),
    (["train.lr=0"], "train.lr=0"),
    (["optimizer.adam_beta2=1.5"], "optimizer.adam_beta2"),
    (["data.kind=parquet"], "data.kind='parquet'"),
    (["cluster.gpus_per_node=8", "parallel.tp=16", "parallel.dp=1"], "exceeds cluster.gpus_per_node"),
    (["train.precision=fp8", "model.transformer_impl=local"], "train.precision=fp8"),
    (["train.recompute=full", "train.recompute_num_layers=3"], "train.recompute_num_layers=3"),
    (["checkpoint.verify=full"], "checkpoint.verify='full'"),
    (["checkpoint.on_corrupt=ignore"], "checkpoint.on_corrupt='ignore'"),
    (["resilience.spikes.grad_norm_factor=1"], "resilience.spikes.grad_norm_factor=1"),
    (["resilience.straggler.consecutive_reports=0"], "resilience.straggler.consecutive_reports"),
    (["parallel=tp2", "model.ffn_hidden_size=351"], "parallel.tp=2 must divide "
     "model.ffn_hidden_size=351"),
    (["cluster=slurm", "cluster.nodes=3", "cluster.gpus_per_node=8", "parallel.tp=6",
      "model.hidden_size=192", "model.num_attention_heads=12", "model.num_query_groups=6",
      "model.ffn_hidden_size=384"], "parallel.tp=6 must divide cluster.gpus_per_node=8"),
    (["cluster.gpus_per_node=4", "parallel.tp=4", "model.num_attention_heads=12",
      "model.num_query_groups=6", "model.hidden_size=96"], "parallel.tp=4 must divide "
     "model.num_query_groups=6 or be a multiple of it"),
    (["model.make_vocab_size_divisible_by=0"], "model.make_vocab_size_divisible_by=0 must be > 0"),
    (["cluster=slurm", "cluster.efa_devices=32"], "cluster.efa_devices=32 and "
     "cluster.require_efa=False need cluster.interconnect=efa"),
    (["cluster=hyperpod_p5", "cluster.efa_devices=-1"], "cluster.efa_devices=-1 must be >= 0"),
    (["cluster=slurm", "model.transformer_impl=local", "kernels.apply_rope_fusion=true"],
     "kernels.apply_rope_fusion=true needs model.transformer_impl=transformer_engine"),
    (["cluster=slurm", "train.precision=fp32", "kernels.cross_entropy_loss_fusion=true"],
     "kernels.cross_entropy_loss_fusion=true needs train.precision=bf16 or fp8"),
    (["model.num_layers=5", "parallel=pp2", "parallel.account_for_loss_in_pipeline_split=true",
      "parallel.account_for_embedding_in_pipeline_split=true"], "model.num_layers=5 cannot be "
     "split this way"),
    (["data=sft_example"], "data.sources[0].path='runs/sft-demo/sft_document' has no loss mask"),
    (["data=sft_example", "parallel=pp2"], "data.packing=true needs parallel.pp=1"),
    (["cluster=slurm", "data=sft_example"], "data.packing=true needs model.transformer_impl="
     "local or CPU ranks; set data.packing=false"),
    (["data.kind=sft", "data.sources=[]"], "data.sources is empty; data.kind=sft needs"),
]


@pytest.mark.parametrize("overrides,fragment", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_each_rule_names_the_field(overrides: list[str], fragment: str) -> None:
    problems = validate(make_config(*overrides))
    assert any(fragment in p for p in problems), problems


def test_context_parallel_is_accepted_where_it_runs() -> None:
    """CPU ranks rehearse CP with the local spec's CP attention; GPUs run TE's (default)."""
    assert validate(make_config("parallel.cp=2", "parallel.dp=1")) == []
    assert validate(make_config("cluster=hyperpod_p5", "cluster.nodes=4", "parallel.auto=false",
                                "parallel.tp=8",
                                "parallel.cp=2", "parallel.sp=true", "parallel.pp=1",
                                "parallel.dp=2")) == []


def test_kv_heads_fewer_than_tp_ranks_are_replicated_not_refused() -> None:
    """megatron-core's Attention replicates KV heads when TP is a multiple of them."""
    assert validate(make_config("parallel.tp=2", "model.num_query_groups=1")) == []


@pytest.mark.parametrize("layout", [("parallel=tp2", "parallel.sp=true"), ("parallel=tp2_overlap",)])
def test_sequence_parallelism_is_refused_where_ranks_run_the_local_spec(
        layout: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """Local ranks on a machine without a GPU build the local spec, whose torch norm asserts
    on sequence parallelism; a GPU cluster builds Transformer Engine's."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    problems = validate(make_config(*layout))
    assert len(problems) == 1 and "cluster.kind=local" in problems[0], problems
    assert problems[0].startswith("parallel.sp=true needs the Transformer Engine spec")
    assert validate(make_config(*layout, "cluster=slurm")) == []


def test_the_aws_profiles_expect_their_instance_type_s_efa_devices() -> None:
    """p5.48xlarge 32 EFA devices, p4d.24xlarge 4 (AWS's EC2 specifications), and NCCL on EFA."""
    for name, devices in (("hyperpod_p5", 32), ("pcs_p5", 32), ("hyperpod_p4d", 4),
                          ("pcs_p4d", 4)):
        cluster = make_config(f"cluster={name}").cluster
        assert (cluster.efa_devices, cluster.require_efa) == (devices, True), name
    assert make_config("cluster=slurm").cluster.efa_devices == 0


def test_default_config_is_valid_and_uses_two_ranks() -> None:
    cfg = make_config()
    assert validate(cfg) == []
    assert derive_layout(cfg).world_size == 2


def test_every_problem_is_reported_at_once() -> None:
    problems = validate(make_config("train.precision=fp16", "parallel.tp=4", "train.recompute=x"))
    assert len(problems) >= 3


@pytest.mark.parametrize("layout", ["dp", "tp2", "pp2"])
def test_shipped_layouts_are_valid_on_the_local_cluster(layout: str) -> None:
    assert validate(make_config(f"parallel={layout}")) == []


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


GROUPS = ["model", "parallel", "cluster", "train", "data"]
SECTIONS = [g for g in GROUPS if g != "cluster"]
"""The groups whose options write into their own section only (asserted below)."""


def _writes_only_its_section(path: Path) -> bool:
    """No package header (which could move it elsewhere) and no defaults list (which could
    choose other groups' options): Hydra merges the file into its group's section alone."""
    return "@package" not in path.read_text() and "defaults" not in OmegaConf.load(path)


def _typed_section(cfg: DictConfig, group: str) -> object:
    """``cfg``'s section typed alone: the same object as typed in the whole config when it
    interpolates nothing from elsewhere (asserted)."""
    assert "${" not in OmegaConf.to_yaml(cfg[group]), group
    return OmegaConf.to_object(cfg[group])


def _combinations_of_cluster(cluster: str) -> int:
    """Type and validate every combination of the section groups' options on ``cluster``.

    A combination's composed config is, section by section, the config composed with that
    section's option alone (its options write nowhere else), so Hydra composes once per
    option, and each combination's typed config is assembled from those typed sections.
    """
    register_schema()
    first = {g: _options(g)[0] for g in SECTIONS}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        def composed(choice: dict[str, str]) -> DictConfig:
            return hydra_compose("config", overrides=[
                f"cluster={cluster}", *(f"{g}={o}" for g, o in choice.items()), "run_dir=x"])
        first_cfg = composed(first)
        base = to_run_config(first_cfg)
        typed = {(g, o): _typed_section(composed(first | {g: o}) if o != first[g] else first_cfg,
                                        g) for g in SECTIONS for o in _options(g)}
        whole = to_run_config(composed({g: _options(g)[-1] for g in SECTIONS}))
    count = 0
    for combo in itertools.product(*(_options(g) for g in SECTIONS)):
        cfg = dataclasses.replace(base, **{g: typed[(g, o)] for g, o in zip(SECTIONS, combo)})
        assert isinstance(validate(cfg), list)
        count += 1
    assert cfg == whole, cluster  # the last combination, assembled, is what Hydra composes
    return count


def test_every_conf_combination_composes() -> None:
    """Each shipped option composes with every other into a typed config (validity varies).

    Hydra's compose takes ~0.3 s: composing the 1,296 combinations one by one took minutes.
    The clusters are spread over the machine's cores."""
    for g in SECTIONS:
        for path in (CONF_DIR / g).glob("*.yaml"):
            assert _writes_only_its_section(path), path
    with multiprocessing.get_context("spawn").Pool(min(os.cpu_count() or 1, 6)) as pool:
        counts = pool.map(_combinations_of_cluster, _options("cluster"))
    assert sum(counts) == len(list(itertools.product(*(_options(g) for g in GROUPS)))) > 0


def test_cli_refuses_bad_config_without_starting_anything(tmp_path: Path) -> None:
    result = run_launch("parallel.tp=4", "train.precision=fp16", cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert any("train.precision" in e for e in errors)
    assert any("tp*pp*cp*dp" in e for e in errors)
    assert not (tmp_path / "runs" / "demo" / "checkpoints").exists()
    assert "submitted" not in result.stdout


def test_cli_names_the_field_of_a_type_error(tmp_path: Path) -> None:
    result = run_launch("parallel.tp=two", cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "parallel.tp" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_dry_run_prints_resolved_config_and_submits_nothing(tmp_path: Path) -> None:
    result = run_launch("parallel=tp2", "launch.dry_run=true", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "TP=2 PP=1" in result.stdout
    assert "tp: 2" in result.stdout
    assert "submitted" not in result.stdout


def test_cli_lists_the_options_of_an_unknown_group_choice(tmp_path: Path) -> None:
    result = run_launch("model=llama9", cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "model/llama9" in result.stderr and "llama3_8b" in result.stderr


@pytest.mark.parametrize("cluster", ["hyperpod_p5", "pcs_p5", "hyperpod_p4d", "pcs_p4d"])
def test_a_gpu_profile_and_a_node_count_are_enough_for_a_multi_node_job(
        tmp_path: Path, cluster: str) -> None:
    """The README's promise: change only the cluster profile and node count."""
    result = run_launch(f"cluster={cluster}", "cluster.nodes=32", "launch.dry_run=true",
                        cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("layout: ")  # the planner chose it for this GPU
    assert "name: llama3_8b" in result.stdout
    assert "#SBATCH --nodes=32" in result.stdout
    assert "#SBATCH --ntasks-per-node=8" in result.stdout
    assert "python -m megatron_ext.train" in result.stdout


def test_command_line_groups_replace_a_gpu_profile_s_defaults(tmp_path: Path) -> None:
    result = run_launch("cluster=pcs_p5", "model=tiny", "parallel=tp2", "train=demo",
                        "train.global_batch_size=32", "train.micro_batch_size=4",
                        "launch.dry_run=true", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "name: tiny" in result.stdout and "TP=2 PP=1" in result.stdout
    assert "steps: 300" in result.stdout  # train=demo, not the profile's pretrain


def test_each_sweep_point_has_its_own_checkpoint_folder_and_s3_prefix() -> None:
    """`-m train.lr=0.001,0.003 checkpoint.s3_uri=s3://bkt/sweep`: a point must never restore
    another point's checkpoint from S3, nor delete its copies by retention."""
    cfg = make_config("checkpoint.s3_uri=s3://bkt/sweep/")
    points = [for_sweep_point(cfg, f"train.lr={lr}", "sweep-1").checkpoint
              for lr in ("0.001", "0.003")]
    assert [p.s3_uri for p in points] == ["s3://bkt/sweep/train.lr=0.001",
                                          "s3://bkt/sweep/train.lr=0.003"]
    assert all(p.problems() == [] for p in points)
    assert len({p.dir for p in points}) == 2
    assert for_sweep_point(make_config(), "train.lr=0.001", "sweep-1").checkpoint.s3_uri == ""


def test_sft_without_packing_is_offered_on_transformer_engine() -> None:
    """Padding (one conversation per sequence) needs no attention mask: TE's causal kernels."""
    problems = validate(make_config("cluster=slurm", "data=sft_example", "data.packing=false"))
    assert [p for p in problems if "packing" in p] == [] and any("loss mask" in p for p in problems)


def test_packing_is_checked_against_the_planner_s_layout_too() -> None:
    cfg = make_config("data=sft_example", "parallel=auto")
    assert not [p for p in validate(cfg) if "packing" in p]
    problems = validate(cfg, Layout(tp=1, pp=2, cp=1, dp=1))
    assert any("data.packing=true needs parallel.pp=1" in p for p in problems), problems

"""Validation during training, through the user's command on 2 CPU ranks over gloo.

One reference run (DP=2, the demo corpus: its 1% validation split and the whole dataset again as
``data.validation``) evaluates at steps 3 and 6. Against it: the same values under TP=2, PP=2 x
VPP=2 and CP=2; training losses bitwise equal with validation off; a run resumed from step 3
evaluating exactly what the reference did at step 6 (its first pass, the reference's second: the
samples do not depend on how many passes came before); and transformers' LlamaForCausalLM on the
exported checkpoint computing the same loss on the same samples.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launch.config import load
from launch.eval_schema import eval_sources
from launch import ckpt_commit as commit
from tests.conftest import run_launch
from tests.integration.conftest import read_metrics
from tests.unit.megatron_forward import free_port
from tools.convert_hf import main as convert_hf

pytestmark = pytest.mark.slow

TRAIN = ["train.steps=6", "train.warmup_steps=1", "train.eval_interval=3", "train.eval_iters=1",
         "train.log_interval=3", "checkpoint.save_interval=3",
         "data.validation=[{path: runs/demo-data/demo_text_document}]"]
KEYS = {"val/loss", "val/demo_text_document/loss", "val/demo_text_document_2/loss"}


def _train(workdir: Path, name: str, *overrides: str) -> list[dict]:
    result = run_launch(f"name={name}", *TRAIN, *overrides, cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return read_metrics(workdir, name)


def _val(rows: list[dict]) -> dict[int, dict[str, float]]:
    return {row["step"]: {k: v for k, v in row.items() if k in KEYS} for row in rows
            if "val/loss" in row}


@pytest.fixture(scope="module")
def reference(workdir: Path) -> list[dict]:
    result = run_launch("name=val-ref", *TRAIN, cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| val loss " in result.stdout  # on rank 0's progress line
    return read_metrics(workdir, "val-ref")


def test_every_layout_gives_the_tp1_validation_losses(reference: list[dict], workdir: Path
                                                      ) -> None:
    expected = _val(reference)
    assert sorted(expected) == [3, 6] and all(set(v) == KEYS for v in expected.values())
    for step in (3, 6):  # both sources have the same token count: the mean is token-weighted
        val = expected[step]
        assert val["val/loss"] == pytest.approx(
            (val["val/demo_text_document/loss"] + val["val/demo_text_document_2/loss"]) / 2)
    assert expected[6]["val/loss"] < expected[3]["val/loss"]  # it learns; agreement is no accident
    layouts = {"tp2": ["parallel=tp2"], "pp2-vpp2": ["parallel=pp2", "parallel.vpp=2"],
               "cp2": ["parallel.cp=2", "parallel.dp=1"]}
    for name, overrides in layouts.items():
        got = _val(_train(workdir, f"val-{name}", *overrides))
        assert sorted(got) == [3, 6], name
        for step in (3, 6):
            for key in KEYS:
                assert got[step][key] == pytest.approx(expected[step][key], rel=1e-4), (name, key)


def test_training_is_bitwise_the_same_with_validation_off(reference: list[dict], workdir: Path
                                                          ) -> None:
    off = _train(workdir, "val-off", "train.eval_interval=0", "train.eval_iters=0")
    assert not any(k.startswith("val/") for row in off for k in row)
    assert [row["loss"] for row in off] == [row["loss"] for row in reference]
    assert [row["grad_norm"] for row in off] == [row["grad_norm"] for row in reference]


def test_a_resumed_run_evaluates_the_same_samples(reference: list[dict], workdir: Path) -> None:
    ckpt = workdir / "runs" / "val-resume" / "checkpoints"
    shutil.copytree(workdir / "runs" / "val-ref" / "checkpoints" / commit.step_dir(3),
                    ckpt / commit.step_dir(3))
    resumed = _train(workdir, "val-resume")
    assert [row["step"] for row in resumed] == [4, 5, 6]
    assert _val(resumed) == {6: _val(reference)[6]}  # exact: same weights, same samples


def _hf_loss(hf_dir: Path, dataset, samples: int) -> float:
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(samples):
            sample = dataset[i]
            logits = model(torch.as_tensor(sample["tokens"])[None]).logits[0]
            per_token = torch.nn.functional.cross_entropy(
                logits.double(), torch.as_tensor(sample["labels"]).long(), reduction="none")
            loss_sum += float((per_token * torch.as_tensor(sample["loss_mask"])).sum())
            tokens += int(torch.as_tensor(sample["loss_mask"]).sum())
    return loss_sum / tokens


def test_the_exported_model_computes_the_validation_loss(reference: list[dict], workdir: Path,
                                                         tmp_path: Path) -> None:
    """Independent of megatron's model code: transformers on the same samples, from the run's
    own dataset (megatron's validation split, rebuilt here from the run's config)."""
    from megatron_ext.validation import build_eval_dataset

    ckpt = workdir / "runs" / "val-ref" / "checkpoints"
    assert convert_hf(["export", "--megatron", str(ckpt / commit.step_dir(6)),
                       "--out", str(tmp_path / "hf")]) == 0
    cfg = load(next((workdir / "runs" / "val-ref" / "launches").glob("*/config.yaml")))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        sets = {s.name: build_eval_dataset(cfg, s, str(tmp_path / "cache"))
                for s in eval_sources(cfg)}
    finally:
        dist.destroy_process_group()
    samples = cfg.train.eval_iters * cfg.train.global_batch_size
    for name, dataset in sets.items():
        assert _hf_loss(tmp_path / "hf", dataset, samples) == pytest.approx(
            _val(reference)[6][f"val/{name}/loss"], abs=1e-4), name

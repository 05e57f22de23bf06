"""train.epochs: fine-tuning counted in passes over the prepared conversations, turned into
train.steps on the login node from the data tool's own count, or refused in one line."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from launch.sft_epochs import with_epochs
from tests.conftest import make_config, run_launch
from tools import demo_chat


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chat")
    demo_chat.make(out)  # 8 conversations, prepared for train.seq_length=64
    return out / "sft_document"


def sft(prefix: Path, *overrides: str):
    return make_config("train=sft", "data=sft_example", f"data.tokenizer={prefix.parent / 'tokenizer'}",
                       f"data.sources=[{{path: {prefix}, weight: 1.0}}]", *overrides)


@pytest.mark.parametrize("packing", [True, False])
def test_epochs_set_the_steps_that_pass_over_the_training_split(prefix: Path, packing: bool) -> None:
    """The steps read ``epochs`` times the sequences the ranks' dataset holds (to the batch)."""
    from megatron_ext.data import sft_dataset

    cfg, problems = with_epochs(sft(prefix, f"data.packing={packing}", "train.epochs=6"))
    assert problems == []
    sequences = len(sft_dataset(cfg, str(prefix), part=0))  # what the ranks train on
    want = math.ceil(6 * sequences / cfg.train.global_batch_size)
    assert abs(cfg.train.steps - want) <= 1, (cfg.train.steps, sequences)


def test_what_epochs_cannot_count_is_refused(prefix: Path, tmp_path: Path) -> None:
    pretrain = make_config("data=synthetic", "train.epochs=2")
    assert "not data.kind=synthetic" in with_epochs(pretrain)[1][0]
    assert "train.steps and train.epochs=3.0 both set" in with_epochs(
        sft(prefix), explicit={"train.steps"})[1][0]
    longer = with_epochs(sft(prefix, "train.seq_length=128"))[1][0]
    assert "counts sequences of 65 tokens" in longer and "--max-tokens 129" in longer
    bare = tmp_path / "bare"
    for suffix in (".bin", ".idx"):  # a dataset without the data tool's stats.json
        (tmp_path / f"bare{suffix}").write_bytes((Path(f"{prefix}{suffix}")).read_bytes())
    assert "has no readable" in with_epochs(sft(bare))[1][0]
    assert "train.epochs=-1.0 must be >= 0" in " ".join(sft(prefix, "train.epochs=-1").train.problems())


def test_the_launcher_prints_the_steps_it_counted(prefix: Path, tmp_path: Path) -> None:
    stats = json.loads(Path(f"{prefix}.stats.json").read_text())
    result = run_launch("train=sft", "data=sft_example", f"data.tokenizer={prefix.parent / 'tokenizer'}",
                        f"data.sources=[{{path: {prefix}, weight: 1.0}}]", "train.epochs=30",
                        "launch.dry_run=true", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    # the preset's split (90% training) and global batch (8); the demo's 8 conversations
    steps = math.ceil(30 * stats["total"]["packed_sequences"] * 0.9 / 8)
    assert f"train.epochs=30.0: train.steps={steps}" in result.stdout
    refused = run_launch("train=sft", "data=sft_example", "train.steps=50",
                         f"data.tokenizer={prefix.parent / 'tokenizer'}",
                         f"data.sources=[{{path: {prefix}, weight: 1.0}}]", "launch.dry_run=true",
                         cwd=tmp_path, timeout=120)
    assert refused.returncode != 0 and "train.steps and train.epochs=3.0 both set" in refused.stderr

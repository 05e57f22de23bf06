"""A relaunch over an existing checkpoint: refused for another architecture or an unchosen lr
schedule, every other change described; and megatron's scheduler follows the chosen rule."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launch import resume
from launch.config import to_yaml
from megatron_ext.optim import lr_scheduler
from tests.conftest import make_config


def _checkpoint(ckpt_dir: Path, step: int, *overrides: str, committed: bool = True) -> Path:
    """A ``step_<N>`` folder as rank 0 commits it: its config.yaml and the commit marker."""
    folder = ckpt_dir / f"step_{step:06d}"
    folder.mkdir(parents=True)
    cfg = make_config(*overrides, f"checkpoint.dir={ckpt_dir}")
    (folder / "config.yaml").write_text(to_yaml(cfg))
    if committed:
        (folder / "COMMITTED.json").write_text(json.dumps({"step": step}))
    return folder


def _check(ckpt_dir: Path, *overrides: str) -> tuple[list[str], str]:
    return resume.check(make_config(*overrides, f"checkpoint.dir={ckpt_dir}"))


def test_another_architecture_is_refused_in_one_line_naming_each_field(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 4)
    problems, _ = _check(tmp_path, "model.num_layers=3", "model.ffn_hidden_size=256")
    assert len(problems) == 1 and "\n" not in problems[0]
    assert "step_000004 of another architecture" in problems[0]
    assert "model.num_layers=3 here, 4 there" in problems[0]
    assert "model.ffn_hidden_size=256 here, 352 there" in problems[0]
    assert "new name" in problems[0] and "checkpoint.dir" in problems[0]


def test_the_newest_committed_checkpoint_is_compared(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 4, "model.num_layers=2")
    _checkpoint(tmp_path, 8)
    _checkpoint(tmp_path, 12, "model.num_layers=2", committed=False)  # a killed save
    assert _check(tmp_path) == ([], "")
    assert _check(tmp_path / "elsewhere", "model.num_layers=2") == ([], "")  # nothing to resume


def test_a_changed_schedule_needs_a_rule(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path, 4, "train.steps=400")
    problems, _ = _check(tmp_path, "train.steps=100")
    assert problems == [f"train.steps: 400 -> 100 changes the lr schedule saved in {folder}: set "
                        "train.lr_schedule_on_resume=checkpoint to keep the saved schedule, or "
                        "train.lr_schedule_on_resume=config to follow this config's from the "
                        "saved step"]
    problems, text = _check(tmp_path, "train.steps=100", "train.lr_schedule_on_resume=checkpoint")
    assert problems == []
    assert "  train.steps: 400 -> 100" in text
    assert "lr schedule: the checkpoint's (train.lr_schedule_on_resume=checkpoint)" in text


def test_other_changed_hyperparameters_are_described(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 4)
    problems, text = _check(tmp_path, "train.global_batch_size=32", "data=synthetic",
                            "cluster.timeout_min=5", "logging.wandb.mode=disabled")
    assert problems == []
    lines = text.splitlines()
    assert lines[0] == f"resuming {tmp_path / 'step_000004'}; changed since its config:"
    assert "  train.global_batch_size: 16 -> 32" in lines
    assert "  data.kind: 'indexed' -> 'synthetic'" in lines
    assert not any("cluster." in line or "logging." in line for line in lines)
    assert "lr schedule" not in text


def _resumed_lrs(rule: str) -> list[float]:
    """A 6-step schedule saved after step 6, loaded into a 10-step config under ``rule``; the
    lr of steps 7..10."""
    param = torch.nn.Parameter(torch.zeros(1))
    saved = lr_scheduler(torch.optim.SGD([param], lr=0.0),
                         make_config("train.steps=6", "train.warmup_steps=1"))
    for _ in range(6):
        saved.step(increment=1)
    optimizer = torch.optim.SGD([param], lr=0.0)
    resumed = lr_scheduler(optimizer, make_config("train.steps=10", "train.warmup_steps=1",
                                                  f"train.lr_schedule_on_resume={rule}"))
    resumed.load_state_dict(saved.state_dict())
    lrs = []
    for _ in range(4):
        resumed.step(increment=1)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_the_resume_follows_the_chosen_schedule() -> None:
    min_lr = make_config().train.min_lr
    assert _resumed_lrs("checkpoint") == pytest.approx([min_lr] * 4)  # decayed at step 6
    config = _resumed_lrs("config")
    assert all(a > b for a, b in zip(config, config[1:])) and config[0] > 2 * min_lr
    with pytest.raises(AssertionError, match="do not match"):
        _resumed_lrs("error")

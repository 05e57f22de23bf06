"""A relaunch under the same ``name`` with a changed config, through the real launch command:
refused on the login node when the checkpoint cannot or should not be resumed as is, resumed
with its changes shown and recorded otherwise."""
from __future__ import annotations

from pathlib import Path

import pytest

from launch.resume import RESUME_CHANGES
from tests.conftest import run_launch
from tests.integration.conftest import read_metrics

pytestmark = pytest.mark.slow

RUN = ("name=relaunch", "data=synthetic", "train.steps=6", "train.warmup_steps=1",
       "train.log_interval=1", "checkpoint.save_interval=3")


def _launches(workdir: Path) -> list[Path]:
    return sorted((workdir / "runs" / "relaunch" / "launches").glob("*"))


def test_a_relaunch_is_refused_or_resumed_with_its_changes_recorded(workdir: Path) -> None:
    first = run_launch(*RUN, cwd=workdir, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    launched = _launches(workdir)
    ckpt = workdir / "runs" / "relaunch" / "checkpoints" / "step_000006"

    layers = run_launch(*RUN, "model.num_layers=3", cwd=workdir, timeout=120)
    assert layers.returncode == 2 and "Global shape mismatch" not in layers.stderr
    assert layers.stderr.splitlines() == [
        f"error: checkpoint.dir={ckpt.parent} holds step_000006 of another architecture "
        "(model.num_layers=3 here, 4 there): it cannot be resumed; use the checkpoint's values, "
        "or start fresh with a new name (name=relaunch-2) or checkpoint.dir"]
    steps = run_launch(*RUN, "train.steps=10", cwd=workdir, timeout=120)
    assert steps.returncode == 2 and "train.steps: 6 -> 10 changes the lr schedule" in steps.stderr
    refused = [d for d in _launches(workdir) if d not in launched]
    assert len(refused) == 2 and not [p.name for d in refused for p in d.iterdir()
                                      if p.name in ("config.yaml", "logs")]  # nothing queued

    resumed = run_launch(*RUN, "train.steps=10", "train.lr_schedule_on_resume=config",
                         "train.global_batch_size=8", cwd=workdir, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    recorded = (_launches(workdir)[-1] / RESUME_CHANGES).read_text()
    assert recorded.splitlines() == [
        f"resuming {ckpt}; changed since its config:",
        "  train.global_batch_size: 16 -> 8",
        "  train.lr_schedule_on_resume: 'error' -> 'config'",
        "  train.steps: 6 -> 10",
        "  lr schedule: this config's (train.lr_schedule_on_resume=config)"]
    assert recorded in resumed.stdout
    rows = read_metrics(workdir, "relaunch")
    assert [r["step"] for r in rows] == list(range(1, 11))
    lrs = [r["lr"] for r in rows[6:]]  # decaying over the new 10 steps, not kept at min_lr
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[0] > rows[5]["lr"]


BLEND = ("data.sources=[{path: runs/demo-data/demo_text_document, weight: 3.0}, "
         "{path: runs/demo-data/demo_text_document, weight: 1.0}]")
ORDER = (BLEND, "train.warmup_steps=1", "train.log_interval=4", "train.micro_batch_size=2",
         "train.eval_interval=0", "train.eval_iters=0", "checkpoint.save_interval=0")


def _digests(workdir: Path, name: str, *overrides: str) -> list[int]:
    result = run_launch(f"name={name}", *ORDER, *overrides, cwd=workdir, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [r["data_digest"] for r in read_metrics(workdir, name)]


def test_a_resume_at_another_global_batch_size_reads_on_in_the_same_sample_order(
        workdir: Path) -> None:
    """4 steps of 16 samples, resumed for 4 steps of 8: the 96 samples a single run of 12
    steps of 8 reads, in its order, none skipped or repeated (a blend of two sources, whose
    index megatron sizes by the samples a run asks for)."""
    reference = _digests(workdir, "gbs-reference", "train.steps=12", "train.global_batch_size=8")
    assert len(reference) == 12 and len(set(reference)) == 12  # each step its own samples
    _digests(workdir, "gbs-change", "train.steps=4", "train.global_batch_size=16")
    resumed = _digests(workdir, "gbs-change", "train.steps=8", "train.global_batch_size=8",
                       "train.lr_schedule_on_resume=config")
    assert resumed[:4] == [a + b for a, b in zip(reference[0:8:2], reference[1:8:2])]
    assert resumed[4:] == reference[8:]
    rows = read_metrics(workdir, "gbs-change")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["consumed_tokens"] == read_metrics(workdir, "gbs-reference")[-1][
        "consumed_tokens"]

"""Megatron's communication overlap on 2 CPU ranks over gloo: same math, different timing."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_launch
from tests.integration.conftest import read_metrics

pytestmark = pytest.mark.slow


def test_overlapped_grad_reduce_and_param_gather_give_the_same_losses(workdir: Path) -> None:
    """Buckets reduced during backward and gathered during the next forward (async gloo
    collectives behind megatron's hooks) must train exactly as the synchronous path does,
    also across a resume: the checkpoint must hold the step's gathered weights."""
    common = ["data=synthetic", "train.warmup_steps=1", "train.lr_decay_style=constant",
              "train.lr_schedule_on_resume=config"]  # 6 -> 8 steps: constant lr either way
    overlap = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]
    for name, steps, overrides in (("sync", 8, []), ("overlap", 6, overlap),
                                   ("overlap", 8, overlap)):  # the last one resumes at step 6
        result = run_launch(f"name=overlap-{name}", f"train.steps={steps}", *common, *overrides,
                            cwd=workdir)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = {name: [row["loss"] for row in read_metrics(workdir, f"overlap-{name}")]
              for name in ("sync", "overlap")}
    assert len(losses["sync"]) == 8 and losses["sync"][-1] < losses["sync"][0]
    assert losses["overlap"] == pytest.approx(losses["sync"], rel=1e-6)

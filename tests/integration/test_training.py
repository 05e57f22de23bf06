"""Real megatron-core training through the user's command: 2 CPU ranks over gloo."""
from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_launch
from tests.integration.conftest import rank_config, read_metrics, torchrun_argv

pytestmark = pytest.mark.slow


def test_demo_loss_falls_clearly_on_the_shipped_corpus(workdir: Path) -> None:
    result = run_launch("name=falls", "train.steps=120", "train.warmup_steps=12", cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "step 120/120" in result.stdout  # rank 0's progress reaches the user
    losses = [row["loss"] for row in read_metrics(workdir, "falls")]
    assert len(losses) == 120
    assert losses[0] == pytest.approx(math.log(512), abs=0.2)  # untrained: uniform over the vocab
    assert sum(losses[-10:]) / 10 < losses[0] - 1.5


def test_tp_pp_and_dp_layouts_give_the_same_loss_curve(workdir: Path) -> None:
    """Same seed, same data, same model: only the split differs, so the math must agree."""
    layouts = {"dp": ["parallel=dp"], "tp2": ["parallel=tp2"], "pp2": ["parallel=pp2"],
               "vpp2": ["parallel=pp2", "parallel.vpp=2"]}
    curves, digests = {}, {}
    for name, overrides in layouts.items():
        result = run_launch(f"name=same-{name}", *overrides, "train.steps=6",
                            "train.warmup_steps=1", cwd=workdir)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        rows = read_metrics(workdir, f"same-{name}")
        curves[name] = [row["loss"] for row in rows]
        digests[name] = [row["data_digest"] for row in rows]
    assert len(curves["dp"]) == 6
    assert curves["dp"][-1] < curves["dp"][0]  # it trains, so agreement is not trivial
    assert len(set(digests["dp"])) == 6
    for name in ("tp2", "pp2", "vpp2"):
        assert curves[name] == pytest.approx(curves["dp"], rel=1e-4), name
        # each global batch's samples counted once, by one rank per replica, whatever the split
        assert digests[name] == digests["dp"], name


def test_a_failing_rank_fails_the_launch(workdir: Path) -> None:
    """A rank that cannot start (a dataset whose files exist, so the login node's check passes,
    but hold no index) ends the job with a non-zero exit."""
    for suffix in (".bin", ".idx"):
        (workdir / "broken").mkdir(exist_ok=True)
        (workdir / "broken" / f"nothing{suffix}").write_bytes(b"")
    result = run_launch("name=broken", "data.prepare_demo=false",
                        "data.sources=[{path: broken/nothing, weight: 1.0}]", cwd=workdir,
                        timeout=300)
    assert result.returncode != 0
    assert "failed" in result.stderr


def test_recomputation_on_cpu_ranks_trains_the_same_loss_curve(workdir: Path) -> None:
    """megatron-core's recomputation reruns layers in backward; under the CPU shim it runs
    there too (it used to build CUDA tensors), and rerunning changes no number."""
    curves = {}
    for mode in ("none", "selective", "full"):
        result = run_launch(f"name=recompute-{mode}", f"train.recompute={mode}",
                            "train.steps=3", "train.warmup_steps=1", cwd=workdir)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        curves[mode] = [row["loss"] for row in read_metrics(workdir, f"recompute-{mode}")]
    assert len(curves["none"]) == 3
    for mode in ("selective", "full"):
        assert curves[mode] == pytest.approx(curves["none"], rel=1e-5), mode


def test_sequence_parallelism_refused_on_cpu_is_what_the_local_spec_ranks_refuse(
        workdir: Path, tmp_path: Path) -> None:
    """The login node refuses it on this GPU-less machine; started by hand, the CPU ranks die
    in megatron's local-spec norm, so the refusal saves a queue wait, not a runnable job."""
    layout = ("parallel=tp2", "parallel.sp=true", "data=synthetic", "train.steps=2",
              "train.warmup_steps=1")
    refused = run_launch("name=sp-cpu", *layout, cwd=workdir, env={"CUDA_VISIBLE_DEVICES": ""})
    assert refused.returncode == 2 and "parallel.sp=true needs the Transformer Engine spec" \
        in refused.stderr, refused.stderr
    config = rank_config(tmp_path / "run", *layout, f"checkpoint.dir={tmp_path / 'ckpt'}")
    ranks = subprocess.run(torchrun_argv("-m", "megatron_ext.train", str(config)),
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert ranks.returncode != 0
    assert "sequence parallel not supported by torch LayerNorm" in ranks.stdout + ranks.stderr

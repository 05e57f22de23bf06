"""Checkpoints with real ranks: 2 CPU processes over gloo, megatron's async torch_dist writer.

One reference run (the user's command) trains 12 steps and saves at 4, 8 and 12; each test
builds a checkpoint folder from its saves, resumes, and compares the loss curve with it.

Resharding (the module docstring of megatron_ext/checkpoint.py): with
checkpoint.optimizer_format=fully_reshardable a checkpoint of any TP/PP/DP(/VPP) layout loads
into any other layout of the same model, optimizer state included; the default
dp_reshardable format allows DP changes only and refuses others with a clear error. Per-rank
RNG states are restored only when the layout is unchanged.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from launch.schema import REQUEUE_REQUEST
from launch import ckpt_commit as commit
from megatron_ext.ckpt_files import listing
from megatron_ext.replicate import S3Replicator, s3_client
from tests.conftest import REPO, run_launch
from tests.integration.conftest import rank_config, read_metrics, torchrun_argv
from tests.s3_server import aws_env, s3_endpoint

pytestmark = pytest.mark.slow

STEPS, INTERVAL = 12, 4
TRAIN = ["data=synthetic", f"train.steps={STEPS}", "train.warmup_steps=2", "train.log_interval=1",
         f"checkpoint.save_interval={INTERVAL}"]


def _config(run_dir: Path, ckpt_dir: Path, *overrides: str) -> Path:
    return rank_config(run_dir, *TRAIN, f"checkpoint.dir={ckpt_dir}", *overrides)


def _torchrun_argv(config: Path) -> list[str]:
    return torchrun_argv("-m", "megatron_ext.train", str(config))


def _torchrun(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_argv(config), capture_output=True, text=True, timeout=180)


def _losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {row["step"]: row["loss"] for row in rows}


@pytest.fixture(scope="module")
def reference(workdir: Path) -> tuple[Path, dict[int, float]]:
    """An uninterrupted run through ``python -m launch``: its saves and its loss curve."""
    result = run_launch("name=ckpt-ref", *TRAIN, cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ckpt_dir = workdir / "runs" / "ckpt-ref" / "checkpoints"
    assert (ckpt_dir / commit.LATEST).read_text().strip() == commit.step_dir(STEPS)
    losses = {row["step"]: row["loss"] for row in read_metrics(workdir, "ckpt-ref")}
    assert sorted(losses) == list(range(1, STEPS + 1))
    return ckpt_dir, losses


def _checkpoints(reference_dir: Path, target: Path, *steps: int) -> Path:
    for step in steps:
        shutil.copytree(reference_dir / commit.step_dir(step), target / commit.step_dir(step))
    return target


def _after(losses: dict[int, float], step: int) -> dict[int, float]:
    return {s: loss for s, loss in losses.items() if s > step}


def test_stopped_at_step_k_and_resumed_gives_the_same_losses_bitwise(reference, workdir):
    ref_dir, ref_losses = reference
    _checkpoints(ref_dir, workdir / "runs" / "ckpt-resume" / "checkpoints", 4)
    result = run_launch("name=ckpt-resume", *TRAIN, cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout and "step 4, 64 samples consumed" in result.stdout
    assert "checksums of" in result.stdout and "verified in" in result.stdout  # before the load
    resumed = {row["step"]: row["loss"] for row in read_metrics(workdir, "ckpt-resume")}
    assert resumed == _after(ref_losses, 4)  # exact float equality: same data, same state


def test_a_partial_checkpoint_is_skipped_with_a_warning(reference, tmp_path):
    ref_dir, ref_losses = reference
    ckpt_dir = _checkpoints(ref_dir, tmp_path / "ckpt", 4)
    partial = ckpt_dir / commit.tmp_dir(8)
    shutil.copytree(ref_dir / commit.step_dir(8), partial)
    (partial / commit.MARKER).unlink()  # every shard written, never committed
    result = _torchrun(_config(tmp_path / "run", ckpt_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"skipping incomplete checkpoint {partial}" in result.stdout
    assert f"resumed from {ckpt_dir / commit.step_dir(4)}" in result.stdout
    assert _losses(tmp_path / "run") == _after(ref_losses, 4)


def _kill_job(job: subprocess.Popen) -> None:
    """SIGKILL every rank with its writer processes (torchrun puts each rank in a session)."""
    for rank in psutil.Process(job.pid).children():
        os.killpg(rank.pid, signal.SIGKILL)
    job.kill()
    job.wait()


def test_a_save_killed_midway_is_skipped_and_training_resumes(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    overrides = ("checkpoint.save_interval=2", "train.steps=14")
    config = _config(tmp_path / "killed", ckpt_dir, *overrides)
    job = subprocess.Popen(_torchrun_argv(config), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and job.poll() is None:
            names = {p.name for p in ckpt_dir.iterdir()} if ckpt_dir.is_dir() else set()
            if any(n.endswith(commit.TMP_SUFFIX) for n in names) and commit.LATEST in names:
                break  # a save is being written and an older one is committed
            time.sleep(0.002)
    finally:
        _kill_job(job)
    left = {p.name: (p / commit.MARKER).is_file() for p in ckpt_dir.iterdir() if p.is_dir()}
    assert commit.incomplete(left), f"the kill came after the commit: {sorted(left)}"
    newest = commit.load_order(left)[0]
    result = _torchrun(_config(tmp_path / "resumed", ckpt_dir, *overrides))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in commit.incomplete(left):
        assert f"skipping incomplete checkpoint {ckpt_dir / name}" in result.stdout
    assert f"resumed from {ckpt_dir / commit.step_dir(newest)}" in result.stdout
    assert sorted(_losses(tmp_path / "resumed")) == list(range(newest + 1, 15))


def _truncate(shard: Path) -> str:
    shard.write_bytes(shard.read_bytes()[:1000])  # a write cut short
    return f"{shard.name} has 1000 bytes"


def _flip_a_byte(shard: Path) -> str:
    data = bytearray(shard.read_bytes())  # silent corruption: the size stays the same
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return f"{shard.name} does not match its SHA-256 in the manifest"


def _corrupt_newest(reference_dir: Path, tmp_path: Path, damage=_truncate) -> tuple[Path, str]:
    """Checkpoints 4 and 8, the largest shard of 8 damaged; the error it must be refused with."""
    ckpt_dir = _checkpoints(reference_dir, tmp_path / "ckpt", 4, 8)
    shard = max((ckpt_dir / commit.step_dir(8)).glob("*.distcp"), key=lambda p: p.stat().st_size)
    return ckpt_dir, damage(shard)


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte], ids=["truncated", "bit-flip"])
def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, damage):
    ref_dir, ref_losses = reference
    ckpt_dir, refusal = _corrupt_newest(ref_dir, tmp_path, damage)
    result = _torchrun(_config(tmp_path / "run", ckpt_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"checkpoint {ckpt_dir / commit.step_dir(8)} is corrupt: {refusal}" in result.stdout
    assert f"resumed from {ckpt_dir / commit.step_dir(4)}" in result.stdout
    assert _losses(tmp_path / "run") == _after(ref_losses, 4)


def test_a_corrupt_checkpoint_stops_the_run_with_on_corrupt_error(reference, tmp_path):
    ckpt_dir, refusal = _corrupt_newest(reference[0], tmp_path)
    result = _torchrun(_config(tmp_path / "run", ckpt_dir, "checkpoint.on_corrupt=error"))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "CheckpointCorrupt" in output and "checkpoint.on_corrupt=error" in output
    assert refusal in output
    assert _losses(tmp_path / "run") == {}  # not one step on a bad state


def test_init_from_a_corrupt_training_checkpoint_stops_before_any_step(reference, tmp_path):
    """``train.init_from`` of another run's checkpoint is checked as resume checks one: a
    shard whose bytes changed (same size) is refused, not trained on."""
    ckpt_dir, refusal = _corrupt_newest(reference[0], tmp_path, _flip_a_byte)
    step = ckpt_dir / commit.step_dir(8)
    result = _torchrun(_config(tmp_path / "run", tmp_path / "fresh", f"train.init_from={step}"))
    assert result.returncode != 0
    assert f"train.init_from={step}: {step} does not match its manifest: {refusal}" in (
        result.stdout + result.stderr), result.stderr[-3000:]
    assert _losses(tmp_path / "run") == {}


def test_the_default_optimizer_format_refuses_a_tp_change_clearly(reference, tmp_path):
    refused = _torchrun(_config(tmp_path / "run", _checkpoints(reference[0], tmp_path / "dp", 4),
                                "parallel=tp2"))
    assert refused.returncode != 0
    assert "LayoutMismatch" in refused.stderr and "fully_reshardable" in refused.stderr


def test_a_fully_reshardable_checkpoint_loads_into_another_layout(reference, tmp_path):
    """Saved with DP=2, resumed with PP=2 x VPP=2 (model chunks model0, model1)."""
    ref_dir, ref_losses = reference
    full = ("checkpoint.optimizer_format=fully_reshardable",)
    saved = _torchrun(_config(tmp_path / "save", tmp_path / "full", *full))
    assert saved.returncode == 0, saved.stdout[-3000:] + saved.stderr[-3000:]
    assert _losses(tmp_path / "save") == ref_losses  # the format changes nothing in training
    for step in (8, 12):
        shutil.rmtree(tmp_path / "full" / commit.step_dir(step))
    result = _torchrun(_config(tmp_path / "run", tmp_path / "full", *full, "parallel=pp2",
                               "parallel.vpp=2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "model and optimizer resharded" in result.stdout
    resumed, expected = _losses(tmp_path / "run"), _after(ref_losses, 4)
    assert sorted(resumed) == sorted(expected)
    assert list(resumed.values()) == pytest.approx(list(expected.values()), rel=1e-4)


def test_a_tp_change_keeps_the_vocabulary_padding_it_was_saved_with(tmp_path):
    """Vocabulary 600 pads to 640 rows at TP=1 and 768 at TP=2; the padding rows' logits enter
    megatron's softmax, so the TP=2 resume builds the saved 640 rows and trains on exactly."""
    run = ("model.vocab_size=600", "checkpoint.optimizer_format=fully_reshardable",
           "train.steps=6", "checkpoint.save_interval=3")
    saved = _torchrun(_config(tmp_path / "save", tmp_path / "ckpt", *run))
    assert saved.returncode == 0, saved.stdout[-3000:] + saved.stderr[-3000:]
    shutil.rmtree(tmp_path / "ckpt" / commit.step_dir(6))
    result = _torchrun(_config(tmp_path / "run", tmp_path / "ckpt", *run, "parallel=tp2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "model and optimizer resharded" in result.stdout
    resumed, expected = _losses(tmp_path / "run"), _after(_losses(tmp_path / "save"), 3)
    assert sorted(resumed) == [4, 5, 6] == sorted(expected)
    assert list(resumed.values()) == pytest.approx(list(expected.values()), rel=1e-4)


def _bucket_copy(bucket: str, prefix: str) -> dict[str, bytes]:
    client = s3_client()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {item["Key"].removeprefix(prefix): client.get_object(
        Bucket=bucket, Key=item["Key"])["Body"].read() for item in listed}


def _local_copy(ckpt_dir: Path) -> dict[str, bytes]:
    return {f"{folder.name}/{f.name}": f.read_bytes()
            for folder in ckpt_dir.glob("step_*") for f in folder.iterdir()}


def test_committed_checkpoints_are_copied_to_s3_and_a_rerun_completes_cut_short_copies(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """checkpoint.s3_uri against a real S3 endpoint (moto's server on 127.0.0.1)."""
    name, bucket = "ckpt-s3", "ckpt-s3"
    run = (f"name={name}", *TRAIN, "checkpoint.keep_last=2",
           f"checkpoint.s3_uri=s3://{bucket}/runs")
    with s3_endpoint() as endpoint:
        for key, value in aws_env(endpoint).items():  # the ranks inherit the environment
            monkeypatch.setenv(key, value)
        s3_client().create_bucket(Bucket=bucket)
        result = run_launch(*run, cwd=workdir)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        ckpt_dir = workdir / "runs" / name / "checkpoints"
        local = _local_copy(ckpt_dir)
        assert {key.split("/")[0] for key in local} == {"step_000008", "step_000012"}
        for step in (4, 8, 12):
            assert f"checkpoint {commit.step_dir(step)} copied to s3://{bucket}/runs/" \
                f"{commit.step_dir(step)}/" in result.stdout
        assert _bucket_copy(bucket, "runs/") == local  # step 4 deleted there too, by retention

        client = s3_client()  # as if the job had been ended while copying
        client.delete_object(Bucket=bucket, Key=f"runs/step_000012/{commit.MARKER}")
        client.delete_object(Bucket=bucket, Key="runs/step_000008/common.pt")
        client.delete_object(Bucket=bucket, Key=f"runs/step_000008/{commit.MARKER}")
        rerun = run_launch(*run, cwd=workdir)  # resumes at the last step, trains no more
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert _bucket_copy(bucket, "runs/") == local

        shutil.rmtree(ckpt_dir)  # the shared filesystem was lost (or a new cluster)
        restored = run_launch(*run, cwd=workdir)
        assert restored.returncode == 0, restored.stdout[-3000:] + restored.stderr[-3000:]
        assert f"restored step_000012 from s3://{bucket}/runs/step_000012/" in restored.stdout
        assert f"resumed from {ckpt_dir / 'step_000012'}" in restored.stdout
        assert _local_copy(ckpt_dir) == {k: v for k, v in local.items()
                                         if k.startswith("step_000012/")}


def test_the_s3_copy_of_the_pre_timeout_save_finishes_before_the_rank_exits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slurm's pre-timeout signal: the ranks save, and rank 0 stays until that save is in S3
    (within the time left before the limit), so a job that is not requeued still has it."""
    bucket, run_dir = "ckpt-stop", tmp_path / "run"
    with s3_endpoint(put_delay_s=3.0) as endpoint:  # the copy outlasts the rank's own exit
        for key, value in aws_env(endpoint).items():  # torchrun's ranks inherit it
            monkeypatch.setenv(key, value)
        s3_client().create_bucket(Bucket=bucket)
        config = _config(run_dir, tmp_path / "ckpt", "train.steps=300", "checkpoint.save_interval=0",
                         "cluster.signal=USR1@120", f"checkpoint.s3_uri=s3://{bucket}/runs")
        job = subprocess.Popen(_torchrun_argv(config), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while len(_losses(run_dir)) < 3 and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.2)
        for rank in psutil.Process(job.pid).children():  # as Slurm signals every task
            rank.send_signal(signal.SIGUSR1)
        output, _ = job.communicate(timeout=120)
        assert job.returncode == 0, output[-3000:]
        saved = next((tmp_path / "ckpt").glob("step_*"))
        assert f"checkpoint {saved.name} copied to s3://{bucket}/runs/{saved.name}/" in output
        copy = _bucket_copy(bucket, "runs/")
    assert copy == _local_copy(tmp_path / "ckpt") and f"{saved.name}/{commit.MARKER}" in copy
    assert (run_dir / REQUEUE_REQUEST).exists()


def _flip_a_byte_in_s3(bucket: str, prefix: str) -> None:
    """The largest object under ``prefix`` gets one byte flipped (same size, marker kept)."""
    client = s3_client()
    largest = max(client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"],
                  key=lambda item: item["Size"])["Key"]
    data = bytearray(client.get_object(Bucket=bucket, Key=largest)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=largest, Body=bytes(data))


def test_after_a_fallback_only_good_checkpoints_are_kept_and_copied_and_restore_falls_back(
        reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 8 bit-flipped, step 4 good: the run falls back to 4 and commits 6. Retention must
    keep 6 (the new commit) and drop the abandoned 8, which must never reach S3. With nothing
    intact left on the shared filesystem, the S3 copies are tried newest first, each verified
    after its download: a damaged one is passed over for the next."""
    ckpt_dir, _ = _corrupt_newest(reference[0], tmp_path, _flip_a_byte)
    bucket = "ckpt-fallback"
    run = ("train.steps=6", "checkpoint.keep_last=1", "checkpoint.keep_every=4",
           f"checkpoint.s3_uri=s3://{bucket}/run",
           "train.lr_schedule_on_resume=config")  # 6 steps over the reference's 12-step schedule
    with s3_endpoint() as endpoint:
        for key, value in aws_env(endpoint).items():  # the ranks inherit the environment
            monkeypatch.setenv(key, value)
        s3_client().create_bucket(Bucket=bucket)
        first = _torchrun(_config(tmp_path / "first", ckpt_dir, *run))
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert f"resumed from {ckpt_dir / commit.step_dir(4)}" in first.stdout
        assert listing(ckpt_dir) == {"step_000004": True, "step_000006": True}
        assert (ckpt_dir / commit.LATEST).read_text().strip() == "step_000006"
        replica = S3Replicator(f"s3://{bucket}/run", client=s3_client())
        assert replica.complete_copies() == [4, 6]  # the corrupt step 8 never went up

        _flip_a_byte_in_s3(bucket, "run/step_000006/")  # damaged at rest, marker intact
        shutil.rmtree(ckpt_dir)  # the shared filesystem lost all but a damaged step 8
        _flip_a_byte(max(_checkpoints(reference[0], ckpt_dir, 8).glob("*/*.distcp"),
                         key=lambda p: p.stat().st_size))
        second = _torchrun(_config(tmp_path / "second", ckpt_dir, *run))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    out = second.stdout
    assert f"checkpoint {ckpt_dir / 'step_000008'} is corrupt" in out
    assert f"restored step_000006 from s3://{bucket}/run/step_000006/" in out
    assert f"checkpoint {ckpt_dir / 'step_000006'} is corrupt" in out
    assert f"restored step_000004 from s3://{bucket}/run/step_000004/" in out
    assert f"resumed from {ckpt_dir / 'step_000004'}" in out
    assert sorted(_losses(tmp_path / "second")) == [5, 6]


def test_a_load_error_on_one_rank_ends_the_run_at_once_and_condemns_no_checkpoint(
        reference, tmp_path: Path) -> None:
    """An I/O error on rank 1 before megatron's load: rank 0 is inside the load's collectives,
    so rank 1 must not join another collective (both would wait out the timeout), and a
    checkpoint whose every byte verified is not corrupt (no fallback, nothing deleted)."""
    ckpt_dir = _checkpoints(reference[0], tmp_path / "ckpt", 4, 8)
    config = _config(tmp_path / "run", ckpt_dir, "resilience.collective_timeout_s=90")
    start = time.monotonic()
    result = subprocess.run(
        torchrun_argv(str(REPO / "tests/integration/faulty_rank.py"), str(config), "load_error",
                      "1"), capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Input/output error (injected)" in output
    assert "is corrupt" not in output and "resumed from" not in output
    assert elapsed < 90, f"the ranks waited out the collective timeout ({elapsed:.0f} s)"
    assert listing(ckpt_dir) == {"step_000004": True, "step_000008": True}
    assert _losses(tmp_path / "run") == {}

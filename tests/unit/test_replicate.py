"""S3 copies of committed checkpoints against a real S3 endpoint (moto's server on loopback)."""
from __future__ import annotations

import functools
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from launch.schema import CheckpointConfig
from launch import ckpt_commit as commit
from megatron_ext.ckpt_files import file_sha256, publish
from megatron_ext.replicate import NullReplicator, S3Replicator, s3_client
from tests.conftest import REPO
from tests.s3_server import aws_env, s3_endpoint

_buckets = itertools.count()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with s3_endpoint() as url:
        yield url


@pytest.fixture
def bucket(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; boto3 finds the endpoint and credentials in the environment."""
    for name, value in aws_env(endpoint).items():
        monkeypatch.setenv(name, value)
    name = f"ckpt-{next(_buckets)}"
    s3_client().create_bucket(Bucket=name)
    return name


def _committed(root: Path, step: int, big: bool = False) -> Path:
    """A folder shaped like a commit: shards, megatron's metadata, config, marker last."""
    folder = root / commit.step_dir(step)
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(os.urandom(9 << 20 if big else 1000))  # 9 MiB: multipart
    (folder / "__1_0.distcp").write_bytes(os.urandom(1000))
    (folder / ".metadata").write_bytes(b"metadata")
    (folder / "common.pt").write_bytes(b"common %d" % step)
    (folder / commit.MARKER).write_text(f'{{"step": {step}}}')
    return folder


def _published(root: Path, step: int) -> Path:
    """A folder committed as rank 0 commits one (``ckpt_files.publish``): a real manifest
    with every shard's SHA-256, as its writer would have recorded it."""
    tmp = root / commit.tmp_dir(step)
    tmp.mkdir(parents=True)
    shards = {f"__{rank}_0.distcp": os.urandom(4000) for rank in (0, 1)}
    for name, data in shards.items():
        (tmp / name).write_bytes(data)
    (tmp / commit.shard_digests_name(0)).write_text(
        json.dumps({name: file_sha256(tmp / name) for name in shards}))
    (tmp / ".metadata").write_bytes(b"metadata")
    (tmp / "common.pt").write_bytes(b"common %d" % step)
    publish(root, step, "model: tiny\n")
    return root / commit.step_dir(step)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _objects(bucket: str, prefix: str = "") -> dict[str, bytes]:
    client = s3_client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            for page in pages for item in page.get("Contents", [])}


def _files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """What the bucket should hold for ``folder``: its files under ``<prefix>/<folder name>/``."""
    return {"/".join(filter(None, (prefix, folder.name, p.name))): p.read_bytes()
            for p in folder.iterdir()}


def _record_calls(client: Any) -> list[str]:
    """The S3 operations the client makes from now on, in the order it starts them."""
    calls: list[str] = []
    client.meta.events.register("before-parameter-build.s3",
                                lambda model, **_: calls.append(model.name))
    return calls


def test_a_commit_is_copied_whole_and_its_marker_goes_up_after_every_other_file(
        bucket: str, tmp_path: Path) -> None:
    folder = _committed(tmp_path, 40, big=True)
    client = s3_client()
    seen_with_marker: list[set[str]] = []

    def listing_when_the_marker_is_written(params: dict, model: Any, **_: Any) -> None:
        if model.name == "PutObject" and params["Key"].endswith(commit.MARKER):
            seen_with_marker.append(set(_objects(bucket)))

    client.meta.events.register("before-parameter-build.s3", listing_when_the_marker_is_written)
    replica = S3Replicator(f"s3://{bucket}/runs/llama/", client=client)
    replica.upload(folder)
    assert replica.wait(timeout_s=30)
    expected = _files(folder, "runs/llama")
    assert _objects(bucket) == expected  # every byte, under <prefix>/<folder name>/
    marker_key = f"runs/llama/{folder.name}/{commit.MARKER}"
    assert seen_with_marker == [set(expected) - {marker_key}]  # a reader of the marker sees all


def test_a_complete_copy_is_not_uploaded_again_and_a_cut_short_one_is_redone(
        bucket: str, tmp_path: Path) -> None:
    folder = _committed(tmp_path, 10)
    client = s3_client()
    calls = _record_calls(client)
    replica = S3Replicator(f"s3://{bucket}", client=client)
    replica.upload(folder)
    assert replica.wait(timeout_s=30) and calls.count("PutObject") == 5
    replica.upload(folder)  # a later job's start: S3 holds this very copy
    assert replica.wait(timeout_s=30) and calls.count("PutObject") == 5
    s3_client().delete_object(Bucket=bucket, Key=f"{folder.name}/{commit.MARKER}")
    replica.upload(folder)  # the job that copied it was ended before the marker went up
    assert replica.wait(timeout_s=30) and calls.count("PutObject") == 10
    assert _objects(bucket) == _files(folder)


@pytest.mark.parametrize("prefix", ["", "runs/llama"])
def test_restore_takes_the_newest_complete_copy_whole_and_skips_a_cut_short_one(
        bucket: str, tmp_path: Path, prefix: str) -> None:
    replica = S3Replicator(f"s3://{bucket}/{prefix}", client=s3_client())
    for step in (10, 20, 30):
        replica.upload(_committed(tmp_path / "fsx", step))
    assert replica.wait(timeout_s=30)
    key = "/".join(filter(None, (prefix, commit.step_dir(30), commit.MARKER)))
    s3_client().delete_object(Bucket=bucket, Key=key)  # step 30's copy was cut short
    lost = tmp_path / "new-fsx" / "checkpoints"
    assert replica.complete_copies() == [10, 20]
    replica.restore(20, lost)
    assert sorted(p.name for p in lost.iterdir()) == [commit.step_dir(20)]  # no .tmp left
    assert _files(lost / commit.step_dir(20)) == _files(tmp_path / "fsx" / commit.step_dir(20))
    assert S3Replicator(f"s3://{bucket}/elsewhere", client=s3_client()).complete_copies() == []


def test_a_restore_cut_short_resumes_keeping_the_intact_shards_it_fetched(
        bucket: str, tmp_path: Path) -> None:
    """A download that outlasts resilience.collective_timeout_s ends the job; the requeued
    one must not start it over (it would never finish), nor keep a damaged shard."""
    replica = S3Replicator(f"s3://{bucket}/runs", client=s3_client())
    folder = _published(tmp_path / "fsx", 30)
    replica.upload(folder)
    assert replica.wait(timeout_s=30)
    lost = tmp_path / "new-fsx"
    cut_short = lost / commit.tmp_dir(30)  # what the first try left
    cut_short.mkdir(parents=True)
    for name in ("__0_0.distcp", "__1_0.distcp", "common.pt"):
        (cut_short / name).write_bytes((folder / name).read_bytes())
    _flip_a_byte(cut_short / "__1_0.distcp")  # same size, wrong bytes
    (cut_short / "__9_0.distcp").write_bytes(b"a killed save's")
    client = s3_client()
    calls = _record_calls(client)
    S3Replicator(f"s3://{bucket}/runs", client=client).restore(30, lost)
    assert _files(lost / commit.step_dir(30)) == _files(folder)
    fetched = [name for name in calls if name in ("GetObject", "HeadObject")]
    # The marker (read first), then __1_0.distcp, .metadata, common.pt and config.yaml again
    # (a HEAD and a GET each); the intact shard __0_0.distcp is not fetched a second time.
    assert fetched.count("GetObject") == 1 + 4 and fetched.count("HeadObject") == 4


def test_retention_deletions_are_mirrored_marker_first_and_only_for_that_step(
        bucket: str, tmp_path: Path) -> None:
    """step_100000 is a key prefix of step_1000000: deleting one must not touch the other."""
    kept, doomed = _committed(tmp_path, 1_000_000), _committed(tmp_path, 100_000)
    client = s3_client()
    replica = S3Replicator(f"s3://{bucket}/p", client=client)
    replica.upload(kept)
    replica.upload(doomed)
    assert replica.wait(timeout_s=30)
    calls = _record_calls(client)
    replica.prune(functools.partial(commit.to_delete, keep_last=1, keep_every=0))
    assert replica.wait(timeout_s=30)
    assert _objects(bucket) == _files(kept, "p")
    deletes = [name for name in calls if name.startswith("Delete")]
    assert deletes == ["DeleteObject", "DeleteObjects"]  # the marker, then the rest


def test_while_every_put_is_refused_s3_keeps_its_last_complete_copies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention in S3 goes by the copies S3 holds: local deletions of checkpoints whose
    newer copies never got there (403, as with a missing KMS grant) are not mirrored."""
    refuse = threading.Event()
    with s3_endpoint(refuse_puts=refuse) as url:
        for name, value in aws_env(url).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # boto3's retries would only slow the test
        s3_client().create_bucket(Bucket="ckpt")
        failures: list[str] = []
        replica = S3Replicator("s3://ckpt/run", client=s3_client(), on_failure=failures.append)
        root = tmp_path / "fsx"
        for step in (2, 4):
            replica.upload(_committed(root, step))
        assert replica.wait(timeout_s=30) and replica.complete_copies() == [2, 4]
        refuse.set()
        for step in (6, 8, 10):  # two jobs' commits, keep_last=2, each copy refused
            replica.upload(_committed(root, step))
            replica.prune(functools.partial(commit.to_delete, keep_last=2, keep_every=0,
                                            newest=step))
        assert replica.wait(timeout_s=60)
        assert len(failures) == 3 and all("AccessDenied" in f for f in failures)
        assert replica.complete_copies() == [2, 4]
        assert _objects("ckpt", "run/step_000004/") == _files(root / "step_000004", "run")


def test_a_start_time_copy_of_a_corrupt_folder_is_refused_not_uploaded(
        bucket: str, tmp_path: Path) -> None:
    """The copies a job makes at its start are of folders nobody verified since their commit:
    a shard with one flipped byte must not reach S3 as a complete copy."""
    folder = _published(tmp_path, 8)
    _flip_a_byte(folder / "__1_0.distcp")
    failures: list[str] = []
    replica = S3Replicator(f"s3://{bucket}/run", client=s3_client(), on_failure=failures.append)
    replica.upload(folder, check=True)
    assert replica.wait(timeout_s=30)
    assert replica.complete_copies() == [] and _objects(bucket) == {}
    assert len(failures) == 1 and "not copied" in failures[0]
    assert "__1_0.distcp does not match its SHA-256" in failures[0]


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: connections are refused


def test_an_unreachable_endpoint_is_reported_not_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in aws_env(f"http://127.0.0.1:{_dead_port()}").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # boto3's retries would only slow the test
    failures: list[str] = []
    replica = S3Replicator("s3://ckpt", client=s3_client(), on_failure=failures.append)
    replica.upload(_committed(tmp_path, 20))
    assert replica.wait(timeout_s=30)
    assert len(failures) == 1
    assert f"upload of {tmp_path / 'step_000020'} (s3://ckpt) failed" in failures[0]
    assert "EndpointConnectionError" in failures[0]


EXIT_SCRIPT = """
import sys, time
from pathlib import Path
from megatron_ext.replicate import S3Replicator, s3_client
replica = S3Replicator(sys.argv[1], client=s3_client())
replica.upload(Path(sys.argv[2]))
start = time.monotonic()
replica.close(timeout_s=float(sys.argv[3]))
print(f"close returned after {time.monotonic() - start:.2f} s", flush=True)
"""


def _exit_after_close(endpoint: str, uri: str, folder: Path,
                      timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, uri, str(folder), str(timeout_s)],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **aws_env(endpoint)})
    return proc, time.monotonic() - start


def test_the_process_exit_waits_for_a_pending_copy(bucket: str, endpoint: str,
                                                   tmp_path: Path) -> None:
    folder = _committed(tmp_path, 30, big=True)
    proc, _ = _exit_after_close(endpoint, f"s3://{bucket}", folder, timeout_s=60)
    assert proc.returncode == 0, proc.stderr
    assert "close returned after 0.0" in proc.stdout  # training's shutdown is not held up
    assert _objects(bucket) == _files(folder)


def test_a_hung_endpoint_holds_the_exit_no_longer_than_the_timeout(tmp_path: Path) -> None:
    """The endpoint accepts connections and never answers (botocore would wait 60 s a read)."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        endpoint = f"http://127.0.0.1:{hung.getsockname()[1]}"
        proc, elapsed = _exit_after_close(endpoint, "s3://ckpt", _committed(tmp_path, 50),
                                          timeout_s=2)
    assert proc.returncode == 0, proc.stderr
    assert "close returned after 0.0" in proc.stdout
    assert "S3 copies still running after 2 s" in proc.stderr
    assert elapsed < 2 + 15  # the timeout plus interpreter and boto3 start-up


def test_off_or_not_rank_0_is_a_no_op_and_bad_uris_are_refused() -> None:
    uri = "s3://ckpt/llama"
    assert isinstance(S3Replicator.from_config(CheckpointConfig(dir="x"), rank=0), NullReplicator)
    assert isinstance(S3Replicator.from_config(CheckpointConfig(dir="x", s3_uri=uri), rank=1),
                      NullReplicator)
    assert CheckpointConfig(dir="x", s3_uri=uri).problems() == []
    for bad in ("ckpt/llama", "s3://", "s3://Bad_Bucket/x", "https://ckpt.s3.amazonaws.com"):
        assert CheckpointConfig(dir="x", s3_uri=bad).problems() == [
            f"checkpoint.s3_uri={bad!r} must be '' (no S3 copies) or s3://<bucket>[/<prefix>], "
            "e.g. s3://my-bucket/llama3-8b"]
    assert CheckpointConfig(dir="x", s3_exit_timeout_s=-1).problems() == [
        "checkpoint.s3_exit_timeout_s=-1 must be >= 0"]

"""Shard checksums on disk: recorded by each rank's writer, merged at the commit, re-checked
before a resume. Megatron's real ``AsyncRequest`` carries a stand-in writer (no torch ranks)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

from launch import ckpt_commit as commit
from megatron_ext.ckpt_files import publish, verify, verify_shards, with_shard_digests


def _write_shards(rank: int, buckets: list, results_queue: object) -> None:
    """Stands in for megatron's writer: one file per bucket ``(path, key, data)``."""
    for path, _key, data in buckets:
        Path(path).write_bytes(data)


def _save(root: Path, step: int, shards_per_rank: dict[int, bytes]) -> Path:
    tmp = root / commit.tmp_dir(step)
    tmp.mkdir(parents=True)
    (tmp / ".metadata").write_bytes(b"meta")
    for rank, data in shards_per_rank.items():
        buckets = [(str(tmp / f"__{rank}_0.distcp"), "k", data)]
        request = with_shard_digests(AsyncRequest(_write_shards, (rank, buckets, None), []),
                                     tmp, rank)
        request.async_fn(*request.async_fn_args)  # what the forked writer process runs
    publish(root, step, "model: tiny\n")
    return root / commit.step_dir(step)


def _all_parts(folder: Path, parts: int) -> list[str]:
    return [p for part in range(parts) for p in verify_shards(folder, part=part, parts=parts)]


def test_the_commit_records_every_shard_checksum_and_drops_the_per_rank_files(tmp_path):
    folder = _save(tmp_path, 4, {0: b"a" * 100, 1: b"b" * 100})
    manifest = json.loads((folder / commit.MARKER).read_text())
    assert sorted(manifest["sha256"]) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(folder.glob("*" + commit.SHARD_DIGESTS_SUFFIX))
    assert verify(folder) == [] and _all_parts(folder, parts=2) == []


def test_a_same_size_bit_flip_passes_the_size_check_but_not_the_checksums(tmp_path):
    folder = _save(tmp_path, 4, {0: b"a" * 100, 1: b"b" * 100})
    shard = folder / "__1_0.distcp"
    shard.write_bytes(b"b" * 50 + b"c" + b"b" * 49)
    assert verify(folder) == []  # sizes and metadata unchanged
    for parts in (1, 2, 3):  # whoever re-hashes it, the damage is reported once
        assert _all_parts(folder, parts) == [
            "__1_0.distcp does not match its SHA-256 in the manifest (its bytes changed after "
            "the save)"]


def test_a_writer_that_failed_leaves_no_checksums_and_the_commit_names_the_shard(tmp_path, caplog):
    tmp = tmp_path / commit.tmp_dir(2)
    tmp.mkdir()
    buckets = [(str(tmp / "__0_0.distcp"), "k", b"x")]
    request = with_shard_digests(AsyncRequest(lambda *args: None, (0, buckets, None), []), tmp, 0)
    request.async_fn(*request.async_fn_args)  # wrote nothing: megatron reports it at finalize
    assert not list(tmp.glob("*" + commit.SHARD_DIGESTS_SUFFIX))
    (tmp / "__0_0.distcp").write_bytes(b"late")  # e.g. a writer that hashed nothing
    publish(tmp_path, 2, "")
    assert "__0_0.distcp has no checksum" in caplog.text


def test_everything_the_marker_vouches_for_is_on_disk_before_the_marker(tmp_path, monkeypatch):
    """A node crash soon after a commit (Lustre, FSx) must not leave a marker naming files that
    only the page cache held: megatron fsyncs the shards and .metadata, not the rest."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    tmp = tmp_path / commit.tmp_dir(4)
    tmp.mkdir()
    for name in ("common.pt", "metadata.json"):
        (tmp / name).write_bytes(b"written by megatron without fsync")
    monkeypatch.setattr(os, "fsync", recording_fsync)
    publish(tmp_path, 4, "model: tiny\n")
    before_marker = synced[:synced.index(commit.MARKER + ".writing")]
    assert {"common.pt", "metadata.json", "config.yaml.writing", tmp.name} <= set(before_marker)
    assert synced[-1] == tmp_path.name  # the rename into place, last

"""A checkpoint folder on disk: shard checksums, the commit, and verification before a load.

The rules (which folders count as committed, retention, what the manifest holds) are pure
functions in ``launch.ckpt_commit``; this module does the I/O. No torch: the HF exporter
and rank 0's checks import it cheaply.

Checksums: each rank's writer process hashes the shards it just wrote (SHA-256, read back
from the page cache while training goes on) into ``__<rank>.sha256.json``; the commit merges
them into the manifest. Resume re-hashes the shards, split over the ranks, so a bit flip
that keeps a file's size (bad disk, interrupted copy from S3) is caught before any rank
loads the state.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from launch import ckpt_commit as commit

log = logging.getLogger("megatron_ext.checkpoint")


def listing(root: Path) -> dict[str, bool]:
    """Folder name -> holds the commit marker; the input of the rules in ``commit``."""
    if not root.is_dir():
        return {}
    return {p.name: (p / commit.MARKER).is_file() for p in root.iterdir() if p.is_dir()}


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_then_digest(write: Callable[..., None], shards: list[str], out: str,
                      *args: Any, **kwargs: Any) -> None:
    """Megatron's shard writer, then this rank's checksums; runs in the writer process."""
    write(*args, **kwargs)
    try:
        digests = {Path(shard).name: file_sha256(Path(shard)) for shard in shards}
    except OSError:
        return  # the write failed: megatron raises it at finalize and nothing is committed
    write_synced(Path(out), json.dumps(digests))


def with_shard_digests(request: Any, folder: Path, rank: int) -> Any:
    """Megatron's ``AsyncRequest`` whose writer also records this rank's shard checksums.

    ``async_fn_args[1]`` holds the write buckets ``(path, key, data)`` of this rank (as
    megatron-core 0.16's ``FileSystemWriterAsync.get_save_function_and_args`` returns them);
    a rank without shards has no writer.
    """
    if request.async_fn is None:
        return request
    shards = [bucket[0] for bucket in request.async_fn_args[1]]
    out = folder / commit.shard_digests_name(rank)
    return request._replace(async_fn=partial(write_then_digest, request.async_fn, shards,
                                             str(out)))


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")
            if p.is_file() and p.name != commit.MARKER}


def _metadata_digest(folder: Path, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in commit.digested(names):
        h.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return h.hexdigest()


def _read_manifest(folder: Path) -> dict[str, Any] | str:
    try:
        return json.loads((folder / commit.MARKER).read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable {commit.MARKER}: {exc}"


def verify(folder: Path) -> list[str]:
    """A committed folder against its manifest: files present, sizes and metadata unchanged."""
    recorded = _read_manifest(folder)
    if isinstance(recorded, str):
        return [recorded]
    files = _file_sizes(folder)
    return commit.manifest_problems(recorded, files, _metadata_digest(folder, list(files)))


def verify_shards(folder: Path, part: int, parts: int) -> list[str]:
    """Re-hash this part of the shards (``part`` of ``parts``) against the manifest."""
    recorded = _read_manifest(folder)
    if isinstance(recorded, str):
        return [recorded]
    mine = commit.shards_of_part(recorded, part, parts)
    return commit.checksum_problems(recorded, {name: file_sha256(folder / name) for name in mine})


def fetched(folder: Path, relative: str, recorded: Mapping[str, Any]) -> bool:
    """Whether ``folder/relative`` is a shard already whole: the size and SHA-256 the manifest
    ``recorded`` gives it (a download cut short keeps what it finished; small files are always
    fetched again)."""
    digest, path = recorded.get("sha256", {}).get(relative), folder / relative
    return (digest is not None and path.is_file()
            and path.stat().st_size == recorded["files"].get(relative)
            and file_sha256(path) == digest)


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk (a node crash on Lustre loses what
    only its page cache held)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, text: str) -> None:
    """Write, fsync and atomically replace: readers see the old or the new file, never half."""
    tmp = path.with_name(path.name + ".writing")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _collect_shard_digests(folder: Path) -> dict[str, str]:
    """Merge (and remove) the per-rank checksum files the writers left in ``folder``."""
    merged: dict[str, str] = {}
    for path in sorted(folder.glob("*" + commit.SHARD_DIGESTS_SUFFIX)):
        merged |= json.loads(path.read_text())
        path.unlink()
    return merged


def publish(root: Path, step: int, config_yaml: str) -> None:
    """Rank 0, after every rank wrote: config, manifest marker, rename, ``latest`` pointer.

    Everything the marker vouches for reaches the disk before the marker does: megatron
    fsyncs the shards and ``.metadata`` but not ``common.pt`` or ``metadata.json``."""
    tmp, final = root / commit.tmp_dir(step), root / commit.step_dir(step)
    write_synced(tmp / "config.yaml", config_yaml)
    checksums = _collect_shard_digests(tmp)
    files = _file_sizes(tmp)
    for name in commit.without_checksum(files, checksums):
        log.warning("%s has no checksum (its writer did not record one): resume checks only "
                    "its size", tmp / name)
    for name in commit.digested(list(files)):
        _fsync(tmp / name)
    _fsync(tmp)
    manifest = commit.manifest(step, files, _metadata_digest(tmp, list(files)), checksums)
    write_synced(tmp / commit.MARKER, json.dumps(manifest, indent=1))
    _fsync(tmp)  # the marker's entry
    if final.exists():  # a run resumed from an older step and reached this one again
        log.warning("replacing %s with the new save of step %d", final, step)
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_synced(root / commit.LATEST, commit.step_dir(step) + "\n")
    _fsync(root)  # the rename itself


def fresh_dir(path: Path) -> None:
    """An empty folder for a save (left-overs of a killed save of the same step go)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

"""Copies of committed checkpoints in S3 (``checkpoint.s3_uri``), for FSx-plus-S3 clusters.

``checkpoint.dir`` is on a shared filesystem, so rank 0 alone uploads, from a daemon thread:
training only enqueues. ``COMMITTED.json`` goes up last and is deleted first, so a copy in S3
is complete if and only if its marker is there; a restore trusts only marked copies, like
the loader trusts only marked folders (``launch.ckpt_commit``). Retention in S3 follows the
copies S3 holds (``prune``), not the local deletions: while uploads fail, S3 keeps its last
complete copies. A failed copy is logged and reported through ``on_failure``, never raised. A
run whose ``checkpoint.dir`` holds no intact checkpoint downloads the complete copies it lacks,
newest first until one verifies (``complete_copies``, ``restore``); a download cut short resumes
where it stopped; a failed download stops the run rather than start over.

boto3 reads the endpoint, region and credentials from the environment (``AWS_ENDPOINT_URL``,
``AWS_REGION``, ``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, the instance
role), as the aws CLI does; nothing of it is in the config.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import boto3
import botocore.config
from boto3.s3.transfer import TransferConfig

from launch.schema import CheckpointConfig
from launch import ckpt_commit as commit
from megatron_ext.background import BackgroundWorker
from megatron_ext.ckpt_files import fetched, verify, verify_shards

log = logging.getLogger("megatron_ext.replicate")

_CONCURRENCY = 8
"""Files uploaded at once: S3 throughput is per connection (tens of MB/s to ~100 MB/s), and a
checkpoint has one shard file per rank."""
# Each file uploads on the (daemon) thread that took it, not in s3transfer's thread pool: a
# pool's threads would hold the exit past s3_exit_timeout_s on a hung endpoint, and a pool takes
# no new work once the interpreter is exiting, which would fail the copies the exit waits for.
_TRANSFER = TransferConfig(use_threads=False)


def s3_client() -> Any:
    """A client configured the way the aws CLI is: from the environment and ~/.aws."""
    config = botocore.config.Config(max_pool_connections=_CONCURRENCY)
    return boto3.session.Session().client("s3", config=config)


class S3Replicator:
    """Uploads and deletions in the order they were asked for, one checkpoint at a time."""

    def __init__(self, uri: str, *, client: Any,
                 on_failure: Callable[[str], object] | None = None) -> None:
        self.uri = uri.rstrip("/")
        self._bucket, _, prefix = self.uri.removeprefix("s3://").partition("/")
        self._prefix = prefix.strip("/")
        self._client, self._on_failure = client, on_failure
        self._jobs = BackgroundWorker("s3-replicate", on_error=self._report)

    @classmethod
    def from_config(cls, cfg: CheckpointConfig, *, rank: int,
                    on_failure: Callable[[str], object] | None = None
                    ) -> S3Replicator | NullReplicator:
        """Rank 0 copies (the folder is shared); every other rank, or no ``s3_uri``: a no-op."""
        if not cfg.s3_uri or rank != 0:
            return NullReplicator()
        log.info("copying committed checkpoints to %s", cfg.s3_uri)
        return cls(cfg.s3_uri, client=s3_client(), on_failure=on_failure)

    def upload(self, folder: Path, *, check: bool = False) -> None:
        """Queue a copy of a committed folder; skipped if S3 holds this very copy already.
        ``check``: first re-hash it against its manifest (a folder nobody verified since its
        commit), and refuse to copy it on a mismatch."""
        self._jobs.submit(f"upload of {folder}", functools.partial(self._upload, folder, check))

    def prune(self, retention: Callable[[Mapping[str, bool]], list[str]]) -> None:
        """Queue the removal of the copies ``retention`` (``commit.to_delete``, bound to the step
        just committed) dooms among those S3 holds, after the uploads queued before."""
        self._jobs.submit("retention", functools.partial(self._prune, retention))

    def wait(self, timeout_s: float) -> bool:
        """Block until everything queued so far was copied or failed; False on timeout."""
        return self._jobs.wait(timeout_s)

    def close(self, timeout_s: float) -> None:
        """Return at once; the process exits when the queued copies end, or after ``timeout_s``.

        A non-daemon thread holds the exit, so the rest of shutdown (the watchdog's close
        among it) is not held up; a run that raised never gets here and exits at once.
        """
        threading.Thread(target=self._finish, args=(timeout_s,), name="s3-replicate-exit").start()

    def _finish(self, timeout_s: float) -> None:
        if not self.wait(timeout_s):
            log.warning("S3 copies still running after %g s (checkpoint.s3_exit_timeout_s, or "
                        "the time left after a stop signal); exiting without them (the next "
                        "job with this checkpoint.dir uploads what %s lacks)", timeout_s, self.uri)

    def _report(self, what: str, exc: Exception) -> None:
        """A failed copy: logged and passed to ``on_failure``; the copies after it go on."""
        message = f"S3 {what} ({self.uri}) failed: {type(exc).__name__}: {exc}"
        log.error("%s", message)
        if self._on_failure is not None:
            with contextlib.suppress(Exception):  # logged above; copies must go on
                self._on_failure(message)

    def _key(self, name: str, relative: str = "") -> str:
        """``<prefix>/<name>/<relative>``: the slash keeps step_100000 off step_1000000."""
        return "/".join(part for part in (self._prefix, name) if part) + "/" + relative

    def _upload(self, folder: Path, check: bool) -> None:
        marker = (folder / commit.MARKER).read_bytes()
        marker_key = self._key(folder.name, commit.MARKER)
        try:
            if self._client.get_object(Bucket=self._bucket, Key=marker_key)["Body"].read() \
                    == marker:
                return  # an earlier job copied this save completely
        except self._client.exceptions.NoSuchKey:
            pass
        problems = (verify(folder) or verify_shards(folder, part=0, parts=1)) if check else []
        if problems:
            raise ValueError(f"not copied: {folder} does not match its manifest: "
                             f"{'; '.join(problems)}")
        start = time.monotonic()
        # A copy of an earlier save of this step stops counting as complete before it changes.
        self._client.delete_object(Bucket=self._bucket, Key=marker_key)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != commit.MARKER)
        _in_parallel(files, lambda path: self._client.upload_file(
            str(path), self._bucket, self._key(folder.name, path.relative_to(folder).as_posix()),
            Config=_TRANSFER))
        self._client.put_object(Bucket=self._bucket, Key=marker_key, Body=marker)
        log.info("checkpoint %s copied to %s/%s/ (%d files, %.1f GB, %.0f s)", folder.name,
                 self.uri, folder.name, len(files) + 1,
                 sum(p.stat().st_size for p in files) / 1e9, time.monotonic() - start)

    def restore(self, step: int, root: Path) -> None:
        """Download the complete copy of ``step`` into ``root`` (a ``checkpoint.dir`` without a
        committed checkpoint: a new or lost shared filesystem). Written as ``step_<N>.tmp`` and
        renamed, marker last: a download cut short is an incomplete folder, never loaded, and
        the next try keeps the shards it already holds intact (their SHA-256 in the marker)."""
        name, start = commit.step_dir(step), time.monotonic()
        tmp = root / commit.tmp_dir(step)
        tmp.mkdir(parents=True, exist_ok=True)
        marker = self._client.get_object(Bucket=self._bucket,
                                         Key=self._key(name, commit.MARKER))["Body"].read()
        recorded = json.loads(marker)
        wanted = {key.removeprefix(self._key(name)): key for key in self._keys(self._key(name))
                  if not key.endswith("/" + commit.MARKER)}
        for path in [p for p in tmp.rglob("*") if p.is_file()]:
            if path.relative_to(tmp).as_posix() not in wanted:
                path.unlink()  # not part of this copy (a killed save's left-overs)
        todo = [key for relative, key in wanted.items() if not fetched(tmp, relative, recorded)]

        def download(key: str) -> None:
            target = tmp / key.removeprefix(self._key(name))
            target.parent.mkdir(parents=True, exist_ok=True)
            self._client.download_file(self._bucket, key, str(target), Config=_TRANSFER)

        _in_parallel(todo, download)
        (tmp / commit.MARKER).write_bytes(marker)
        os.replace(tmp, root / name)
        log.info("restored %s from %s/%s/ (%d files, %d kept from an earlier try, %.0f s): %s "
                 "held no intact one", name, self.uri, name, len(wanted) + 1,
                 len(wanted) - len(todo), time.monotonic() - start, root)

    def _keys(self, prefix: str) -> list[str]:
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self._bucket,
                                                                       Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def _copies(self) -> dict[str, bool]:
        """Folder name -> its copy holds the marker (uploaded last), as ``ckpt_files.listing``."""
        root = f"{self._prefix}/" if self._prefix else ""
        found: dict[str, bool] = {}
        for key in self._keys(root):
            name = key.removeprefix(root).split("/")[0]
            found[name] = found.get(name, False) or key.endswith("/" + commit.MARKER)
        return found

    def complete_copies(self) -> list[int]:
        """Steps whose copy is complete, oldest first."""
        return commit.committed_steps(self._copies())

    def _prune(self, retention: Callable[[Mapping[str, bool]], list[str]]) -> None:
        for name in retention(self._copies()):
            self._delete(name)

    def _delete(self, name: str) -> None:
        """The marker first: a copy half deleted must not look complete."""
        self._client.delete_object(Bucket=self._bucket, Key=self._key(name, commit.MARKER))
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self._bucket,
                                                                       Prefix=self._key(name))
        for page in pages:  # at most 1000 keys a page, as many as one delete_objects takes
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                failed = self._client.delete_objects(
                    Bucket=self._bucket, Delete={"Objects": keys, "Quiet": True}).get("Errors")
                if failed:
                    raise RuntimeError(f"{len(failed)} objects not deleted, e.g. {failed[0]}")


def _in_parallel(items: list[Any], transfer: Callable[[Any], object]) -> None:
    """``transfer`` every item, ``_CONCURRENCY`` at a time on daemon threads; raises the first
    error (on the calling thread)."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for item in items:
        todo.put(item)
    errors: list[Exception] = []

    def work() -> None:
        while not errors:
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                transfer(item)
            except Exception as exc:  # re-raised on the calling thread below
                errors.append(exc)

    threads = [threading.Thread(target=work, name="s3-transfer", daemon=True)
               for _ in range(min(_CONCURRENCY, len(items)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


class NullReplicator:
    """No ``checkpoint.s3_uri``, or not rank 0: same interface, does nothing."""

    def upload(self, folder: Path, *, check: bool = False) -> None:
        pass

    def prune(self, retention: Callable[[Mapping[str, bool]], list[str]]) -> None:
        pass

    def close(self, timeout_s: float) -> None:
        pass

    def complete_copies(self) -> list[int]:
        return []

"""The commit protocol of a checkpoint folder, as pure functions (no torch, no I/O).

Layout of ``checkpoint.dir``::

    step_000120.tmp/     being written (or left by a killed save): never loaded
    step_000120/         renamed from .tmp after every rank finished; COMMITTED.json inside
    latest               text "step_000120", replaced atomically after each commit

A folder is committed iff its name is ``step_<N>`` and it holds the marker. The marker is
a manifest (every file's size, a digest of the small metadata files and the SHA-256 of every
shard, recorded by the rank that wrote it), so a shard that went missing, was truncated or
changed later is caught before anything is loaded. Resume scans the
folders rather than trusting ``latest``: a crash between the rename and the pointer update
leaves the pointer one checkpoint behind, never ahead.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

MARKER = "COMMITTED.json"
LATEST = "latest"
TMP_SUFFIX = ".tmp"
# Small files whose bytes the manifest hashes: megatron's metadata, the common state, config.
DIGESTED = (".metadata", "metadata.json", "common.pt", "config.yaml")
# What a rank's writer leaves beside its shards; merged into the manifest at the commit.
SHARD_DIGESTS_SUFFIX = ".sha256.json"
SHARD_SUFFIX = ".distcp"
_STEP_DIR = re.compile(r"step_(\d+)")


def step_dir(step: int) -> str:
    return f"step_{step:06d}"


def tmp_dir(step: int) -> str:
    return step_dir(step) + TMP_SUFFIX


def shard_digests_name(rank: int) -> str:
    return f"__{rank}{SHARD_DIGESTS_SUFFIX}"


def parse_step(name: str) -> int | None:
    """The step of a committed-style folder name; None for anything else (tmp included)."""
    match = _STEP_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


def committed_steps(listing: Mapping[str, bool]) -> list[int]:
    """Steps of committed folders, oldest first. ``listing``: folder name -> has marker."""
    return sorted(step for name, marked in listing.items()
                  if marked and (step := parse_step(name)) is not None)


def incomplete(listing: Mapping[str, bool]) -> list[str]:
    """Folders that look like checkpoints but must never be loaded (killed or unfinished)."""
    def is_tmp(name: str) -> bool:
        return name.endswith(TMP_SUFFIX) and parse_step(name.removesuffix(TMP_SUFFIX)) is not None

    return sorted(name for name, marked in listing.items()
                  if is_tmp(name) or (parse_step(name) is not None and not marked))


def load_order(listing: Mapping[str, bool]) -> list[int]:
    """Candidates to resume from, newest first; the loader falls back down this list."""
    return committed_steps(listing)[::-1]


def to_delete(listing: Mapping[str, bool], *, keep_last: int, keep_every: int,
              newest: int | None = None) -> list[str]:
    """Folders the retention policy removes after the commit of step ``newest`` (default: the
    newest committed step).

    Kept: ``newest``, the ``keep_last`` newest committed steps up to it and every step up to it
    divisible by ``keep_every`` (0: none). Steps above ``newest`` are of a history the run left
    when it resumed from an older step (the newer ones would not load): they never count as
    the last ones, and go. When ``listing`` holds no committed step up to ``newest`` (an S3
    prefix whose copies of this run's saves failed), nothing goes: the last good copy stays.
    Incomplete folders older than ``newest`` are debris of killed saves and go too; a newer one
    may still be in flight, so it stays.
    """
    steps = committed_steps(listing)
    newest = steps[-1] if newest is None and steps else newest
    current = [s for s in steps if newest is not None and s <= newest]
    if not current:
        return []
    keep = set(current[-keep_last:])
    if keep_every:
        keep |= {s for s in current if s % keep_every == 0}
    doomed = [step_dir(s) for s in steps if s not in keep]
    for name in incomplete(listing):
        step = parse_step(name.removesuffix(TMP_SUFFIX))
        if step is not None and step < current[-1]:
            doomed.append(name)
    return sorted(doomed)


def manifest(step: int, files: Mapping[str, int], digest: str,
             checksums: Mapping[str, str]) -> dict:
    """What the marker records: file sizes in bytes, the metadata digest, shard checksums."""
    return {"step": step, "files": dict(sorted(files.items())), "digest": digest,
            "sha256": dict(sorted(checksums.items()))}


def manifest_problems(recorded: Mapping, files: Mapping[str, int], digest: str) -> list[str]:
    """Why a committed folder no longer matches its marker's sizes; empty when intact."""
    out = []
    for name, size in recorded["files"].items():
        if name not in files:
            out.append(f"{name} is missing")
        elif files[name] != size:
            out.append(f"{name} has {files[name]} bytes, the manifest says {size}")
    if recorded["digest"] != digest:
        out.append("metadata digest differs from the manifest")
    return out


def without_checksum(files: Iterable[str], checksums: Mapping[str, str]) -> list[str]:
    """Shards the manifest could not record a checksum for (their writer did not report)."""
    return sorted(n for n in files if n.endswith(SHARD_SUFFIX) and n not in checksums)


def shards_of_part(recorded: Mapping, part: int, parts: int) -> list[str]:
    """The shards one of ``parts`` verifiers re-hashes: every shard exactly once overall."""
    return sorted(recorded.get("sha256", {}))[part::parts]


def checksum_problems(recorded: Mapping, computed: Mapping[str, str]) -> list[str]:
    """Shards whose bytes changed since their writer hashed them (same size or not)."""
    return [f"{name} does not match its SHA-256 in the manifest (its bytes changed after "
            "the save)" for name, value in sorted(computed.items())
            if recorded["sha256"][name] != value]


def digested(names: Iterable[str]) -> list[str]:
    """The files of a checkpoint whose bytes go into the digest, in a fixed order."""
    return sorted(n for n in names if n in DIGESTED)

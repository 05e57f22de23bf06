"""One input file -> one shard: its documents that pass the per-document stages, tokenized
(``.bin``/``.idx``), what the corpus-wide stages need about each (``.docs.npz``: dedup key,
line, tokens, language, PII hits, MinHash signature), and a summary (``.json``, written last:
its presence marks the shard finished).

A shard holds every document of its file that the per-document stages keep, duplicates
included: which of them survive dedup is decided later over all shards in input order, so a
shard's contents depend on its own file, the tokenizer's contents and the options only, and a
rerun may reuse it whatever changed in the other files.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy

from launch.tokenizer import tokenizer_file
from tools.curation.records import Record

MALFORMED_EXAMPLES = 20
"""Malformed records named (file:line: reason) per file; all are counted."""
AUDIT_SAMPLE = 200
"""PII hits kept for review: those with the smallest hash, so the sample is uniform and the
same whichever shards a rerun reused."""

Chunk = tuple[bool, list[tuple[int, str, tuple[int, ...]]]]
"""For a worker: whether the file is exempt from PII masking, and (line, text, paragraphs to
remove) per document."""
Mapper = Callable[[Iterator[Chunk]], Iterable[list[Any]]]


@functools.cache
def builder_class() -> type:
    """megatron-core's writer; its import takes seconds and warns about missing GPU kernels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return IndexedDatasetBuilder


def shard_prefix(shards: Path, path: Path) -> Path:
    digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=4).hexdigest()
    name = path.name.split(".")[0]
    return shards / f"{name}-{digest}"


def tokenizer_digest(tokenizer: Path) -> str:
    """The tokenizer's contents (tokenizer.json and the config naming its end-of-document
    token), not its path: a tokenizer replaced in place makes every shard stale."""
    file = tokenizer_file(tokenizer)
    digest = hashlib.blake2b(file.read_bytes(), digest_size=16)
    config = file.parent / "tokenizer_config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    return digest.hexdigest()


def source_id(path: Path, options: dict[str, Any], tokenizer: str,
              paragraphs: str = "") -> dict[str, Any]:
    """What a shard was made from (``tokenizer``: its digest; ``paragraphs``: the digest of
    the paragraphs removed from its documents, which depend on the files before it); a shard
    is reused only when all of it still matches."""
    stat = path.stat()
    source = {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "tokenizer": tokenizer, "options": options, "paragraphs": paragraphs}
    return json.loads(json.dumps(source))  # tuples -> lists, as the summary reads back


def finished(shard: Path, source: dict[str, Any]) -> dict[str, Any] | None:
    summary = Path(f"{shard}.json")
    if not summary.is_file() or not Path(f"{shard}.docs.npz").is_file():
        return None
    stats = json.loads(summary.read_text())
    return stats if stats.get("source") == source else None


def _chunks(records: Iterable[Record], stats: dict[str, Any], path: Path, exempt: bool,
            drops: dict[int, tuple[int, ...]], size: int) -> Iterator[Chunk]:
    """Good records in chunks for the workers; malformed ones counted and named here."""
    chunk: list[tuple[int, str, tuple[int, ...]]] = []
    for record in records:
        stats["documents"] += 1
        if record.text is None:
            stats["malformed"][record.problem] += 1
            if len(stats["malformed_examples"]) < MALFORMED_EXAMPLES:
                detail = f" ({record.detail})" if record.detail else ""
                stats["malformed_examples"].append(f"{path}:{record.line}: {record.problem}"
                                                   f"{detail}")
            continue
        chunk.append((record.line, record.text, drops.get(record.line, ())))
        if len(chunk) == size:
            yield exempt, chunk
            chunk = []
    if chunk:
        yield exempt, chunk


def _audit_entry(path: Path, line: int, kind: str, context: str) -> dict[str, Any]:
    rank = hashlib.blake2b(f"{path}:{line}:{context}".encode(), digest_size=8).hexdigest()
    return {"rank": rank, "class": kind, "file": str(path), "line": line, "context": context}


def bottom(entries: list[dict[str, Any]], k: int = AUDIT_SAMPLE) -> list[dict[str, Any]]:
    return sorted(entries, key=lambda e: e["rank"])[:k]


def write_shard(path: Path, shard: Path, records: Iterable[Record], mapper: Mapper,
                dtype: type, progress: Any, exempt_pii: bool,
                drops: dict[int, tuple[int, ...]] | None = None,
                chunk: int = 64) -> dict[str, Any]:
    """Run the per-document stages over one file's records into ``shard``; its summary.
    ``drops``: line -> paragraphs to remove first (tools/curation/paragraphs.py)."""
    tmp = Path(f"{shard}.tmp")
    builder = builder_class()(f"{tmp}.bin", dtype=dtype)
    stats: dict[str, Any] = {"documents": 0, "malformed": Counter(), "malformed_examples": [],
                             "dropped": Counter()}
    cols: dict[str, list[Any]] = {k: [] for k in ("key", "line", "tokens", "language", "pii",
                                                  "signature")}
    audit: list[dict[str, Any]] = []
    pii_classes: list[str] = []
    for results in mapper(_chunks(records, stats, path, exempt_pii, drops or {}, chunk)):
        tokens = 0
        for line, doc, ids in results:
            audit += [_audit_entry(path, line, kind, ctx) for kind, ctx in doc.audit]
            if ids is None:
                stats["dropped"][doc.drop] += 1
                continue
            builder.add_document(ids, [len(ids)])
            pii_classes = pii_classes or list(doc.pii)
            for name, value in (("key", numpy.frombuffer(doc.dedup_key, numpy.uint8)),
                                ("line", line), ("tokens", len(ids)), ("language", doc.language),
                                ("pii", [doc.pii[k] for k in pii_classes]),
                                ("signature", doc.signature)):
                cols[name].append(value)
            tokens += len(ids)
        progress.update(len(results), tokens)
    builder.finalize(f"{tmp}.idx")
    n = len(cols["line"])
    arrays = {"key": numpy.array(cols["key"], numpy.uint8).reshape(n, 16),
              "line": numpy.array(cols["line"], numpy.int64),
              "tokens": numpy.array(cols["tokens"], numpy.int64),
              "language": numpy.array(cols["language"], dtype=str),
              "pii": numpy.array(cols["pii"], numpy.int64).reshape(n, len(pii_classes)),
              "pii_classes": numpy.array(pii_classes, dtype=str)}
    if n and cols["signature"][0] is not None:
        arrays["signature"] = numpy.stack(cols["signature"])
    with open(f"{tmp}.docs.npz", "wb") as f:
        numpy.savez(f, **arrays)
    for ext in (".bin", ".idx", ".docs.npz"):
        os.replace(f"{tmp}{ext}", f"{shard}{ext}")
    stats["audit"] = bottom(audit)
    return stats


def load_docs(shard: Path) -> dict[str, numpy.ndarray]:
    with numpy.load(f"{shard}.docs.npz") as data:
        return {k: data[k] for k in data.files}

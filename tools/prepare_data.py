"""JSONL/Parquet text -> megatron-core indexed dataset (.bin/.idx), with a local HF tokenizer.

    python -m tools.prepare_data --input data/raw --tokenizer hf/tokenizer.json \
        --output-prefix data/web_text_document --workers 2 --dedup --nfkc --redact-pii

Each document becomes its tokens followed by end-of-document, as Megatron's own
preprocessor writes them. Every input file is tokenized into its own shard under
``<prefix>.shards/``; a shard whose summary exists is skipped on a rerun, so a killed job
resumes where it stopped. The shards are then merged, in input order, into ``<prefix>``.
Workers tokenize in parallel; the main process keeps document order and the dedup set, so
the output does not depend on ``--workers``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy

from launch.tokenizer import load_tokenizer
from tools import text_filters
from tools.prepare_progress import Progress, format_report
from tools.text_filters import Options

_CHUNK = 64  # documents per task sent to a worker: amortises the pickling round trip


def encode_document(tokenizer: Any, text: str, eod: int) -> numpy.ndarray:
    """One document: its tokens (with the tokenizer's own BOS, if it adds one), then EOD."""
    ids = tokenizer.encode(text).ids
    ids.append(eod)
    return numpy.asarray(ids, dtype=numpy.int32)


def token_dtype(vocab_size: int) -> type:
    """Megatron's choice: 2 bytes per token while the ids fit, else 4."""
    return numpy.uint16 if vocab_size < 65536 else numpy.int32


# -- input --------------------------------------------------------------------------------
def input_files(inputs: list[Path]) -> list[Path]:
    """Files given, and the .jsonl/.parquet files under directories given, in sorted order."""
    out: list[Path] = []
    for path in inputs:
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".parquet"))
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    if not out:
        raise FileNotFoundError(f"no .jsonl or .parquet files in {', '.join(map(str, inputs))}")
    return out


def read_texts(path: Path, text_key: str) -> Iterator[str]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise RuntimeError(f"{path}: reading Parquet needs pyarrow "
                               "(pip install pyarrow)") from None
        for batch in pq.ParquetFile(path).iter_batches(columns=[text_key]):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)
        return
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield json.loads(line)[text_key]
                except (json.JSONDecodeError, KeyError) as err:
                    raise ValueError(f"{path}:{n}: no {text_key!r} field ({err})") from None


# -- workers ------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, options: Options) -> None:
    tokenizer, eod = load_tokenizer(Path(tokenizer_path))
    _WORKER.update(tokenizer=tokenizer, eod=eod, options=options)


def _process(texts: list[str]) -> list[tuple[text_filters.Filtered, numpy.ndarray | None]]:
    """Filter and tokenize a chunk; the texts stay here, only keys, counts and ids go back."""
    out = []
    for text in texts:
        doc = text_filters.apply(text, _WORKER["options"])
        ids = None if doc.text is None else encode_document(_WORKER["tokenizer"], doc.text,
                                                              _WORKER["eod"])
        out.append((dataclasses.replace(doc, text=None), ids))
    return out


def _chunks(texts: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- shards -------------------------------------------------------------------------------
@functools.cache
def _builder_class() -> type:
    """megatron-core's writer; its import takes seconds and warns about missing GPU kernels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return IndexedDatasetBuilder


def _shard_prefix(shards: Path, path: Path) -> Path:
    digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=4).hexdigest()
    return shards / f"{path.stem}-{digest}"


def _source_id(path: Path, options: Options, tokenizer: Path) -> dict[str, Any]:
    """What a shard was made from; a shard is reused only when all of it still matches."""
    stat = path.stat()
    return {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "tokenizer": str(tokenizer.resolve()), "options": dataclasses.asdict(options)}


def _finished(shard: Path, source: dict[str, Any]) -> dict[str, Any] | None:
    summary = Path(f"{shard}.json")
    if not summary.is_file():
        return None
    stats = json.loads(summary.read_text())
    return stats if stats.get("source") == source else None


def write_shard(path: Path, shard: Path, mapper: Any, dtype: type, seen: set[bytes],
                progress: Progress, options: Options) -> dict[str, Any]:
    """Tokenize one input file into ``shard``.bin/.idx; its .json summary, written last,
    marks it finished. Dedup keys of kept documents go to ``shard``.keys for reruns."""
    tmp = Path(f"{shard}.tmp")
    builder = _builder_class()(f"{tmp}.bin", dtype=dtype)
    stats = dict.fromkeys(("documents", "kept", "duplicates", "too_short", "tokens", "email",
                           "phone"), 0)
    keys: list[bytes] = []
    for results in mapper(_chunks(read_texts(path, options.text_key))):
        tokens = 0
        for doc, ids in results:
            stats["documents"] += 1
            if ids is None:
                stats["too_short"] += 1
                continue
            if doc.dedup_key:
                if doc.dedup_key in seen:
                    stats["duplicates"] += 1
                    continue
                seen.add(doc.dedup_key)
                keys.append(doc.dedup_key)
            builder.add_document(ids, [len(ids)])
            stats["kept"] += 1
            tokens += len(ids)
            for kind, count in doc.pii.items():
                stats[kind] += count
        stats["tokens"] += tokens
        progress.update(len(results), tokens)
    builder.finalize(f"{tmp}.idx")
    for ext in (".bin", ".idx"):
        os.replace(f"{tmp}{ext}", f"{shard}{ext}")
    Path(f"{shard}.keys").write_bytes(b"".join(keys))
    return stats


def merge(shards: list[Path], prefix: Path, dtype: type) -> None:
    """Concatenate the shards, in input order, into ``prefix``.bin/.idx (replaced atomically)."""
    tmp = Path(f"{prefix}.merging")
    builder = _builder_class()(f"{tmp}.bin", dtype=dtype)
    for shard in shards:
        builder.add_index(str(shard))
    builder.finalize(f"{tmp}.idx")
    for ext in (".bin", ".idx"):
        os.replace(f"{tmp}{ext}", f"{prefix}{ext}")


def prepare(inputs: list[Path], tokenizer: Path, prefix: Path, options: Options,
            workers: int = 1, keep_shards: bool = False) -> dict[str, Any]:
    """The whole pipeline; the per-file and total statistics (also in <prefix>.stats.json)."""
    files = input_files(inputs)
    vocab_size = load_tokenizer(tokenizer)[0].get_vocab_size()
    dtype = token_dtype(vocab_size)
    shards_dir = Path(f"{prefix}.shards")
    shards_dir.mkdir(parents=True, exist_ok=True)
    _builder_class()  # imported before the clock starts
    seen: set[bytes] = set()
    per_file: list[dict[str, Any]] = []
    started = time.monotonic()
    # spawn, not fork: a forked copy of a process running tokenizers' or torch's threads can crash
    spawn = multiprocessing.get_context("spawn")
    pool = spawn.Pool(workers, _init_worker, (str(tokenizer), options)) if workers > 1 else None
    if pool is None:
        _init_worker(str(tokenizer), options)
    mapper = (lambda chunks: pool.imap(_process, chunks)) if pool else (lambda c: map(_process, c))
    try:
        with Progress() as progress:
            for path in files:
                shard = _shard_prefix(shards_dir, path)
                source = _source_id(path, options, tokenizer)
                stats = _finished(shard, source)
                if stats is None:
                    stats = write_shard(path, shard, mapper, dtype, seen, progress, options)
                    stats["source"] = source
                    Path(f"{shard}.json").write_text(json.dumps(stats, indent=1))
                else:
                    stats["skipped"] = True
                    raw = Path(f"{shard}.keys").read_bytes()
                    seen.update(raw[i:i + 16] for i in range(0, len(raw), 16))
                per_file.append({**stats, "file": str(path), "shard": str(shard)})
    finally:
        if pool:
            pool.close()
            pool.join()
    merge([Path(r["shard"]) for r in per_file], prefix, dtype)
    if not keep_shards:
        shutil.rmtree(shards_dir)
    report = {"files": per_file, "seconds": time.monotonic() - started, "vocab_size": vocab_size,
              "dtype": numpy.dtype(dtype).name, "output_prefix": str(prefix), "workers": workers}
    report["total"] = {k: sum(r[k] for r in per_file) for k in
                       ("documents", "kept", "duplicates", "too_short", "tokens", "email", "phone")}
    Path(f"{prefix}.stats.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, nargs="+", required=True,
                        help=".jsonl/.parquet files, or directories searched for them")
    parser.add_argument("--tokenizer", type=Path, required=True,
                        help="tokenizer.json, or a Hugging Face directory holding one")
    parser.add_argument("--output-prefix", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=max((os.cpu_count() or 2) - 1, 1),
                        help="tokenizing processes (default: cores - 1; the main process "
                        "reads, dedups and writes)")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--min-chars", type=int, default=0)
    parser.add_argument("--dedup", action="store_true", help="exact dedup of normalised text")
    parser.add_argument("--nfkc", action="store_true", help="Unicode NFKC normalisation")
    parser.add_argument("--redact-pii", action="store_true", help="mask e-mails and phone numbers")
    parser.add_argument("--keep-shards", action="store_true",
                        help="keep the per-file shards after the merge")
    args = parser.parse_args(argv)
    options = Options(nfkc=args.nfkc, min_chars=args.min_chars, dedup=args.dedup,
                      redact_pii=args.redact_pii, text_key=args.text_key)
    try:
        report = prepare(args.input, args.tokenizer, args.output_prefix, options,
                         workers=max(args.workers, 1), keep_shards=args.keep_shards)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"prepare_data: {err}", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

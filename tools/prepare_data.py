"""JSONL/Parquet text -> megatron-core indexed dataset (.bin/.idx), with a local HF tokenizer.

    python -m tools.prepare_data --input data/raw --tokenizer hf/tokenizer.json \
        --output-prefix data/web_text_document --workers 2 --dedup --nfkc --redact-pii

Each document becomes its tokens followed by end-of-document, as Megatron's own
preprocessor writes them. With ``--paragraph-dup``, repeated paragraphs are planned away first,
over all files in input order. Every input file is read (malformed records counted by reason,
never fatal), filtered per document (length, language, quality, PII) and tokenized into its
own shard under ``<prefix>.shards/``; a shard whose source (file, tokenizer contents,
options, paragraphs removed) is unchanged is reused on a rerun, so a killed job resumes where
it stopped. Exact and near-duplicate dedup (against earlier corpora too) then run over all
shards in input order, and the survivors are merged into ``<prefix>``: the output is the same
fresh or resumed, whatever ``--workers``.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import itertools
import json
import multiprocessing
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy

from launch.tokenizer import load_tokenizer
from tools import text_filters
from tools.curation import dedup_index, paragraphs
from tools.curation.records import TextField, input_files, read_records
from tools.curation.selection import merge, select
from tools.curation.shards import (Chunk, bottom, builder_class, finished, load_docs,
                                   shard_prefix, source_id, tokenizer_digest, write_shard)
from tools.curation.stats import file_row, summarise
from tools.prepare_chat import format_chat_report, prepare_chat
from tools.prepare_cli import parse
from tools.prepare_progress import Progress, format_report
from tools.text_filters import Options, shard_options


def encode_document(tokenizer: Any, text: str, eod: int) -> numpy.ndarray:
    """One document: its tokens (with the tokenizer's own BOS, if it adds one), then EOD."""
    ids = tokenizer.encode(text).ids
    ids.append(eod)
    return numpy.asarray(ids, dtype=numpy.int32)


def token_dtype(vocab_size: int) -> type:
    """Megatron's choice: 2 bytes per token while the ids fit, else 4."""
    return numpy.uint16 if vocab_size < 65536 else numpy.int32


# -- workers ------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, options: Options) -> None:
    tokenizer, eod = load_tokenizer(Path(tokenizer_path))
    _WORKER.update(tokenizer=tokenizer, eod=eod, options=options)


def _process(chunk: Chunk) -> list[tuple[int, Any, Any]]:
    """Filter and tokenize a chunk; the texts stay here, only keys, counts and ids go back."""
    exempt, items = chunk
    out = []
    for line, text, drops in items:
        if drops and not (text := paragraphs.remove(text, drops)).strip():
            out.append((line, text_filters.Filtered(None, drop=paragraphs.DROP_REASON), None))
            continue
        doc = text_filters.apply(text, _WORKER["options"], exempt_pii=exempt)
        ids = None if doc.text is None else encode_document(_WORKER["tokenizer"], doc.text,
                                                              _WORKER["eod"])
        out.append((line, dataclasses.replace(doc, text=None), ids))
    return out


def _fingerprint(items: list[tuple[int, str]]) -> list[tuple[int, int, list[Any]]]:
    return [(line, len(text), paragraphs.fingerprints(text)) for line, text in items]


# -- pipeline -----------------------------------------------------------------------------
def _plan(files: list[Path], options: Options, run: Callable,
          shards_dir: Path) -> paragraphs.Plan | None:
    """The paragraphs to remove, planned over every file in input order before any shard is
    written; each file's fingerprints are kept beside its shard, so a rerun reads and hashes
    only the files that changed (the removals themselves depend on all files before)."""
    if options.paragraph_dup <= 0:
        return None
    plan = paragraphs.Plan(options.paragraph_dup)
    for path in files:
        cache = Path(f"{shard_prefix(shards_dir, path)}.paragraphs.npz")
        source = source_id(path, {"text_key": options.text_key}, "")
        documents = paragraphs.load(cache, source)
        if documents is None:
            good = ((r.line, r.text) for r in read_records(path, TextField(options.text_key))
                    if r.text is not None)
            chunks = iter(lambda: list(itertools.islice(good, 64)), [])
            documents = [doc for result in run(_fingerprint, chunks) for doc in result]
            paragraphs.save(cache, documents, source)
        plan.add_file(documents)
    return plan


def _shard(path: Path, shards_dir: Path, mapper: Any, dtype: type, progress: Progress,
           options: Options, tokenizer: str, code_sources: tuple[str, ...],
           removed: tuple[dict[int, tuple[int, ...]], str]) -> dict[str, Any]:
    """A finished shard of ``path``: reused when its source still matches, else written;
    ``removed``: the paragraphs the plan removes from its documents, and their digest."""
    shard = shard_prefix(shards_dir, path)
    source = source_id(path, shard_options(options), tokenizer, removed[1])
    summary = finished(shard, source)
    if summary is not None:
        return {**summary, "skipped": True, "shard": str(shard)}
    exempt = any(fnmatch.fnmatch(str(path), pattern) for pattern in code_sources)
    records = read_records(path, TextField(options.text_key))
    summary = write_shard(path, shard, records, mapper, dtype, progress, exempt, removed[0])
    summary["source"] = source
    Path(f"{shard}.json").write_text(json.dumps(summary, indent=1))
    return {**summary, "shard": str(shard)}


def _select_and_merge(files: list[Path], summaries: list[dict[str, Any]], prefix: Path,
                      dtype: type, options: Options,
                      plan: paragraphs.Plan | None) -> dict[str, Any]:
    shards = [Path(s["shard"]) for s in summaries]
    docs = [load_docs(shard) for shard in shards]
    earlier = [dedup_index.load(dedup_index.path_of(e)) for e in options.dedup_against]
    chosen = select(docs, options.dedup, options.near_dup, earlier)
    merge(shards, chosen.keep, prefix, dtype)
    if options.dedup or options.near_dup > 0:
        dedup_index.write(prefix, docs, chosen.keep, keys=options.dedup,
                          signatures=options.near_dup > 0)
    rows = []
    for i, (path, s, d) in enumerate(zip(files, summaries, docs)):
        selected = {"duplicates": chosen.duplicates[i], "near_duplicates":
                    chosen.near_duplicates[i], "earlier_duplicates": chosen.earlier[i],
                    "paragraphs_removed": plan.removed[i] if plan else 0,
                    "paragraph_chars_removed": plan.characters[i] if plan else 0}
        rows.append({**file_row(path, s, d, chosen.keep[i], selected),
                     **({"skipped": True} if s.get("skipped") else {})})
    audit = bottom([e for s in summaries for e in s["audit"]])
    if audit:
        Path(f"{prefix}.pii_audit.jsonl").write_text(
            "".join(json.dumps({k: v for k, v in e.items() if k != "rank"}, ensure_ascii=False)
                    + "\n" for e in audit))
    return {"files": rows, **summarise(rows, chosen, plan, list(options.dedup_against))}


def prepare(inputs: list[Path], tokenizer: Path, prefix: Path, options: Options,
            workers: int = 1, keep_shards: bool = False,
            code_sources: tuple[str, ...] = ()) -> dict[str, Any]:
    """The whole pipeline; the per-file and total statistics (also in <prefix>.stats.json)."""
    files = input_files(inputs)
    vocab_size = load_tokenizer(tokenizer)[0].get_vocab_size()
    dtype = token_dtype(vocab_size)
    shards_dir = Path(f"{prefix}.shards")
    shards_dir.mkdir(parents=True, exist_ok=True)
    builder_class()  # imported before the clock starts
    started = time.monotonic()
    # spawn, not fork: a forked copy of a process running tokenizers' or torch's threads can crash
    spawn = multiprocessing.get_context("spawn")
    pool = spawn.Pool(workers, _init_worker, (str(tokenizer), options)) if workers > 1 else None
    if pool is None:
        _init_worker(str(tokenizer), options)
    run = pool.imap if pool else map
    try:
        plan = _plan(files, options, run, shards_dir)
        with Progress() as progress:
            digest = tokenizer_digest(tokenizer)
            summaries = [_shard(path, shards_dir, functools.partial(run, _process), dtype,
                                progress, options, digest, code_sources,
                                (plan.drops[i], plan.digest(i)) if plan else ({}, ""))
                         for i, path in enumerate(files)]
    finally:
        if pool:
            pool.close()
            pool.join()
    report = _select_and_merge(files, summaries, prefix, dtype, options, plan)
    if not keep_shards:
        shutil.rmtree(shards_dir)
    report.update(seconds=time.monotonic() - started, vocab_size=vocab_size,
                  dtype=numpy.dtype(dtype).name, output_prefix=str(prefix), workers=workers)
    Path(f"{prefix}.stats.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    return report


def main(argv: list[str] | None = None) -> int:
    try:
        args, options = parse(argv)
        if args.format == "chat":
            report = prepare_chat(args.input, args.tokenizer, args.output_prefix,
                                  args.max_tokens, keep_shards=args.keep_shards)
            print(format_chat_report(report))
            return 0
        report = prepare(args.input, args.tokenizer, args.output_prefix, options,
                         workers=max(args.workers, 1), keep_shards=args.keep_shards,
                         code_sources=tuple(args.code_sources))
    except (OSError, ValueError, RuntimeError) as err:
        print(f"prepare_data: {err}", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of tools.prepare_data (tokens/s) with 1 and 2 workers, plain and with all filters.

The corpus is generated offline: the standard library's docstrings, repeated with a per-copy
suffix so dedup keeps them, in 4 JSONL files; the tokenizer is an 8,192-token byte-level BPE
trained on it. Run from the repository root:
    .venv/bin/python benchmarks/prepare_data.py [--copies N]
Prints a table and writes benchmarks/results/prepare_data.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

from tools.demo_data import stdlib_docstrings, train_tokenizer
from tools.prepare_data import prepare
from tools.text_filters import Options

RESULT = Path(__file__).resolve().parent / "results" / "prepare_data.json"
FILES = 4
VOCAB = 8192


def write_corpus(folder: Path, copies: int) -> tuple[list[Path], int]:
    docs = list(stdlib_docstrings())
    paths = [folder / f"part-{i}.jsonl" for i in range(FILES)]
    handles = [p.open("w") for p in paths]
    n = chars = 0
    for copy in range(copies):
        for doc in docs:
            text = f"{doc}\n(copy {copy}, contact docs{copy}@example.org)"
            handles[n % FILES].write(json.dumps({"text": text}) + "\n")
            n, chars = n + 1, chars + len(text)
    for h in handles:
        h.close()
    return paths, chars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=16)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths, chars = write_corpus(folder, args.copies)
        train_tokenizer(paths[0], folder / "tokenizer.json", VOCAB)
        variants = {"plain": Options(), "all filters": Options(nfkc=True, dedup=True,
                                                               redact_pii=True, min_chars=50)}
        for name, options in variants.items():
            for workers in (1, 2):
                report = prepare(paths, folder / "tokenizer.json", folder / f"out{workers}{name}",
                                 options, workers=workers)
                tokens, seconds = report["total"]["tokens"], report["seconds"]
                rows.append({"options": name, "workers": workers, "documents":
                             report["total"]["documents"], "tokens": tokens,
                             "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds)})
    print(f"corpus: {rows[0]['documents']:,} documents, {chars / 1e6:.1f} M characters, "
          f"{FILES} files, {VOCAB}-token BPE")
    print(f"{'options':<12} {'workers':>7} {'tokens':>12} {'seconds':>8} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['options']:<12} {r['workers']:>7} {r['tokens']:>12,} {r['seconds']:>8.2f} "
              f"{r['tokens_per_s']:>10,}")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python":
                                              platform.python_version()},
                                  "corpus_characters": chars, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

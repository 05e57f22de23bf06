"""Throughput of tools.prepare_data with 1 and 2 workers, each curation stage off and on, side
by side: plain; the PR-0 filters (NFKC, exact dedup, PII, length); + language id and quality
rules; + MinHash near-dup; and the PII detectors' precision/recall on the labelled corpus.

The corpus is generated offline: the standard library's docstrings, repeated with a per-copy
suffix so dedup keeps them, in 4 JSONL files; the tokenizer is an 8,192-token byte-level BPE
trained on it. Run from the repository root:
    .venv/bin/python benchmarks/prepare_data.py [--copies N]
Prints a table and writes benchmarks/results/prepare_data.json. Input MB/s is the measure to
compare across variants (dedup stages keep fewer tokens by design); tokens/s counts the tokens
written.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

from tools.curation.pii_eval import evaluate
from tools.demo_data import stdlib_docstrings, train_tokenizer
from tools.prepare_data import prepare
from tools.text_filters import Options

RESULT = Path(__file__).resolve().parent / "results" / "prepare_data.json"
PII_CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "pii_corpus.jsonl"
FILTERS = dict(nfkc=True, dedup=True, redact_pii=True, min_chars=50)
VARIANTS = {"plain": Options(), "filters": Options(**FILTERS),
            "+lang+quality": Options(**FILTERS, langid=True, quality=True),
            "+near-dup": Options(**FILTERS, near_dup=0.8),
            "all stages": Options(**FILTERS, langid=True, quality=True, near_dup=0.8)}
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


def run(folder: Path, paths: list[Path], chars: int) -> list[dict]:
    rows = []
    for name, options in VARIANTS.items():
        for workers in (1, 2):
            report = prepare(paths, folder / "tokenizer.json", folder / f"out{workers}{name}",
                             options, workers=workers)
            tokens, seconds = report["total"]["tokens"], report["seconds"]
            rows.append({"options": name, "workers": workers, "documents":
                         report["total"]["documents"], "kept": report["total"]["kept"],
                         "tokens": tokens, "seconds": round(seconds, 2),
                         "input_mb_per_s": round(chars / 1e6 / seconds, 2),
                         "tokens_per_s": round(tokens / seconds)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths, chars = write_corpus(folder, args.copies)
        train_tokenizer(paths[0], folder / "tokenizer.json", VOCAB)
        rows = run(folder, paths, chars)
    print(f"corpus: {rows[0]['documents']:,} documents, {chars / 1e6:.1f} M characters, "
          f"{FILES} files, {VOCAB}-token BPE")
    print(f"{'options':<14} {'workers':>7} {'kept':>8} {'tokens':>12} {'seconds':>8} "
          f"{'input MB/s':>10} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['options']:<14} {r['workers']:>7} {r['kept']:>8,} {r['tokens']:>12,} "
              f"{r['seconds']:>8.2f} {r['input_mb_per_s']:>10.2f} {r['tokens_per_s']:>10,}")
    pii = {k: {m: v[m] for m in ("tp", "fp", "fn", "precision", "recall")}
           for k, v in evaluate(PII_CORPUS).items()}
    print(f"\nPII detectors on {PII_CORPUS.name}:")
    for kind, v in pii.items():
        print(f"{kind:<12} precision {v['precision']:.3f} recall {v['recall']:.3f} "
              f"(tp {v['tp']}, fp {v['fp']}, fn {v['fn']})")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python":
                                              platform.python_version()},
                                  "corpus_characters": chars, "rows": rows, "pii": pii},
                                 indent=1) + "\n")


if __name__ == "__main__":
    main()

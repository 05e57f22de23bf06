"""Throughput of tools.prepare_data with 1 and 2 workers, each curation stage off and on, side
by side in one run: plain; the PR-0 filters (NFKC, exact dedup, PII, length); + language id
and quality rules; + MinHash near-dup; + paragraph near-dup; + perplexity (a character model
of the first 200 docstrings); all stages; and the PII detectors' precision/recall on the
labelled corpus.

The corpus is generated offline: the standard library's docstrings, repeated with a per-copy
suffix (so exact dedup keeps them) and one of a few boilerplate paragraphs (a cookie notice, a
license header, a navigation line), in 4 JSONL files; the tokenizer is an 8,192-token
byte-level BPE trained on it. Run from the repository root:
    .venv/bin/python benchmarks/prepare_data.py [--copies N] [--workers 1 2] [--output PATH]
Prints a table and writes benchmarks/results/prepare_data.json (the defaults made the committed
one). Input MB/s is the measure to compare across variants (dedup stages keep fewer tokens by
design); tokens/s counts the tokens written. Megatron-LM's own tools/preprocess_data.py is not
run here (megatron-core's wheel does not ship it); the byte-identical output and the 1.33-1.46x
speed-up over it were measured by hand (issue #27).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from tools.curation.pii_eval import evaluate  # noqa: E402
from tools.demo_data import stdlib_docstrings, train_tokenizer  # noqa: E402
from tools.prepare_data import prepare  # noqa: E402
from tools.text_filters import Options  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "prepare_data.json"
PII_CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "pii_corpus.jsonl"
FILTERS = dict(nfkc=True, dedup=True, redact_pii=True, min_chars=50)
VARIANTS = {"plain": Options(), "filters": Options(**FILTERS),
            "+lang+quality": Options(**FILTERS, langid=True, quality=True),
            "+near-dup": Options(**FILTERS, near_dup=0.8),
            "+paragraph-dup": Options(**FILTERS, paragraph_dup=0.8),
            "+perplexity": Options(**FILTERS, max_perplexity=30.0),
            "all stages": Options(**FILTERS, langid=True, quality=True, near_dup=0.8,
                                  paragraph_dup=0.8, max_perplexity=30.0)}
REFERENCE_DOCS = 200
"""The perplexity variants' reference text: the first docstrings, written to reference.txt."""
BOILERPLATE = (
    "We use cookies to improve your experience on this site. By continuing to browse you agree "
    "to our use of cookies, as described in our privacy policy.",
    "# Copyright (c) the authors. Licensed under the Apache License, Version 2.0; you may not "
    "use this file except in compliance with the License.",
    "Home | Documentation | Downloads | Community | About | Contact | Search this site",
)
FILES = 4
VOCAB = 8192


def write_corpus(folder: Path, copies: int) -> tuple[list[Path], int]:
    docs = list(stdlib_docstrings())
    paths = [folder / f"part-{i}.jsonl" for i in range(FILES)]
    handles = [p.open("w") for p in paths]
    n = chars = 0
    for copy in range(copies):
        for doc in docs:
            text = (f"{doc}\n(copy {copy}, contact docs{copy}@example.org)\n\n"
                    f"{BOILERPLATE[n % len(BOILERPLATE)]}")
            handles[n % FILES].write(json.dumps({"text": text}) + "\n")
            n, chars = n + 1, chars + len(text)
    for h in handles:
        h.close()
    return paths, chars


def run(folder: Path, paths: list[Path], chars: int, workers: list[int]) -> list[dict]:
    rows = []
    reference = folder / "reference.txt"
    reference.write_text("\n\n".join(list(stdlib_docstrings())[:REFERENCE_DOCS]))
    for name, options in VARIANTS.items():
        if options.max_perplexity:
            options = dataclasses.replace(options, perplexity_reference=str(reference))
        for n in workers:
            report = prepare(paths, folder / "tokenizer.json", folder / f"out{n}{name}",
                             options, workers=n)
            tokens, seconds = report["total"]["tokens"], report["seconds"]
            rows.append({"options": name, "workers": n, "documents":
                         report["total"]["documents"], "kept": report["total"]["kept"],
                         "tokens": tokens, "seconds": round(seconds, 2),
                         "input_mb_per_s": round(chars / 1e6 / seconds, 2),
                         "tokens_per_s": round(tokens / seconds),
                         "paragraph_chars_removed_pct":
                         report["paragraphs"].get("characters_removed_pct", 0.0),
                         "retention_pct": {s["stage"]: s["retention_pct"]
                                           for s in report["stages"] if s["in"] != s["out"]}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=16, help="copies of the docstrings")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths, chars = write_corpus(folder, args.copies)
        train_tokenizer(paths[0], folder / "tokenizer.json", VOCAB)
        rows = run(folder, paths, chars, args.workers)
    print(f"corpus: {rows[0]['documents']:,} documents, {chars / 1e6:.1f} M characters, "
          f"{FILES} files, {VOCAB}-token BPE")
    print(f"{'options':<15} {'workers':>7} {'kept':>8} {'tokens':>12} {'seconds':>8} "
          f"{'input MB/s':>10} {'tokens/s':>10} {'para chars %':>12}")
    for r in rows:
        print(f"{r['options']:<15} {r['workers']:>7} {r['kept']:>8,} {r['tokens']:>12,} "
              f"{r['seconds']:>8.2f} {r['input_mb_per_s']:>10.2f} {r['tokens_per_s']:>10,} "
              f"{r['paragraph_chars_removed_pct']:>12.2f}")
    pii = {k: {m: v[m] for m in ("tp", "fp", "fn", "precision", "recall")}
           for k, v in evaluate(PII_CORPUS).items()}
    print(f"\nPII detectors on {PII_CORPUS.name}:")
    for kind, v in pii.items():
        print(f"{kind:<12} precision {v['precision']:.3f} recall {v['recall']:.3f} "
              f"(tp {v['tp']}, fp {v['fp']}, fn {v['fn']})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python":
                                                   platform.python_version()},
                                       "copies": args.copies, "corpus_characters": chars,
                                       "rows": rows, "pii": pii}, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

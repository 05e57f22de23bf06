"""tools.prepare_data's command line: flags -> Options, every bad value refused up front with
one line naming the flag and what it accepts, before a file is read."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from tools.curation import dedup_index, pii
from tools.curation.language import parse_languages
from tools.text_filters import Options


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.prepare_data",
                                description="JSONL/Parquet text -> megatron-core .bin/.idx")
    p.add_argument("--input", type=Path, nargs="+", required=True,
                   help=".jsonl, .jsonl.gz or .parquet files, or directories searched for them")
    p.add_argument("--tokenizer", type=Path, required=True,
                   help="tokenizer.json, or a Hugging Face directory holding one")
    p.add_argument("--output-prefix", type=Path, required=True)
    p.add_argument("--workers", type=int, default=max((os.cpu_count() or 2) - 1, 1),
                   help="tokenizing processes (default: cores - 1; the main process "
                   "reads, dedups and writes)")
    p.add_argument("--format", choices=("text", "chat"), default="text",
                   help="text: pre-training documents; chat: 'messages' or prompt/response "
                   "records for fine-tuning, rendered with the tokenizer's chat template and "
                   "written with a loss mask on the answers")
    p.add_argument("--max-tokens", type=int, default=4097,
                   help="--format chat: drop (and count) longer conversations; at most "
                   "train.seq_length + 1 so one fits a training sequence")
    p.add_argument("--text-key", default="text")
    p.add_argument("--min-chars", type=int, default=0)
    p.add_argument("--dedup", action="store_true",
                   help="exact dedup of normalised text, corpus-wide (first copy kept)")
    p.add_argument("--near-dup", type=float, default=0.0, metavar="JACCARD",
                   help="also drop near-duplicates (MinHash-LSH) at or above this similarity, "
                   "e.g. 0.8; 0 (default) is off")
    p.add_argument("--paragraph-dup", type=float, default=0.0, metavar="JACCARD",
                   help="remove paragraphs (blank-line separated, 40+ characters) repeating an "
                   "earlier one at or above this similarity, e.g. 0.8: boilerplate; 0 is off")
    p.add_argument("--dedup-against", nargs="+", default=[], metavar="PREFIX",
                   help="exclude the documents of earlier corpora (their --output-prefix or "
                   "<prefix>.dedup.npz); implies --dedup, and near-dup if both used --near-dup")
    p.add_argument("--nfkc", action="store_true", help="Unicode NFKC normalisation")
    p.add_argument("--redact-pii", action="store_true",
                   help="look for PII and apply --pii (default: mask e-mails and phones)")
    p.add_argument("--pii", default="default", metavar="CLASS=POLICY,...",
                   help=f"classes {', '.join(pii.CLASSES)}; policies {', '.join(pii.POLICIES)}")
    p.add_argument("--pii-locale", default="us",
                   help=f"phone formats of these profiles: {', '.join(pii.LOCALES)}")
    p.add_argument("--code-sources", nargs="*", default=[], metavar="GLOB",
                   help="input files holding code, exempt from PII masking (e.g. '*/github/*')")
    p.add_argument("--languages", default="",
                   help="keep only these languages (ISO 639-1, e.g. de,en); implies --langid")
    p.add_argument("--langid", action="store_true",
                   help="identify each document's language; tokens per language in the report")
    p.add_argument("--quality", action="store_true", help="heuristic quality filters")
    p.add_argument("--perplexity-reference", type=Path, default=None, metavar="TEXT",
                   help="a trusted in-domain text (plain, .jsonl or .parquet) whose character "
                   "5-gram model scores each document; needs --max-perplexity")
    p.add_argument("--max-perplexity", type=float, default=0.0,
                   help="drop documents above this per-character perplexity (e.g. 30)")
    p.add_argument("--keep-shards", action="store_true",
                   help="keep the per-file shards after the merge")
    return p


TEXT_ONLY = ("dedup", "near_dup", "nfkc", "redact_pii", "languages", "langid", "quality",
             "min_chars", "code_sources", "paragraph_dup", "dedup_against",
             "perplexity_reference", "max_perplexity")
"""Flags of the pre-training path that --format chat does not apply (refused, not ignored)."""


def check(options: Options) -> None:
    """ValueError naming the flag of the first bad value."""
    if options.min_chars < 0:
        raise ValueError(f"--min-chars {options.min_chars}: expected 0 or more")
    if not 0 <= options.near_dup < 1:
        raise ValueError(f"--near-dup {options.near_dup}: expected a Jaccard similarity in "
                         "(0, 1), e.g. 0.8, or 0 for off")
    if not 0 <= options.paragraph_dup < 1:
        raise ValueError(f"--paragraph-dup {options.paragraph_dup}: expected a Jaccard "
                         "similarity in (0, 1), e.g. 0.8, or 0 for off")
    if bool(options.perplexity_reference) != (options.max_perplexity > 0):
        raise ValueError("--perplexity-reference and --max-perplexity go together: a reference "
                         "text file and a perplexity above 1, e.g. 30")
    if options.perplexity_reference and not Path(options.perplexity_reference).is_file():
        raise ValueError(f"--perplexity-reference {options.perplexity_reference}: no such file")
    if options.perplexity_reference and options.max_perplexity <= 1:
        raise ValueError(f"--max-perplexity {options.max_perplexity}: expected more than 1 "
                         "(a perplexity per character), e.g. 30")
    for spec in options.dedup_against:
        dedup_index.path_of(spec)
    options.dedup = options.dedup or bool(options.dedup_against)
    pii.Policy.parse(options.pii, options.pii_locale)
    if options.languages:
        options.languages = ",".join(parse_languages(options.languages))


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Options]:
    args = parser().parse_args(argv)
    if args.format == "chat":
        text_only = [f"--{k.replace('_', '-')}" for k in TEXT_ONLY if getattr(args, k)]
        if text_only:
            raise ValueError(f"{', '.join(text_only)}: pre-training filters; --format chat "
                             "takes --input, --tokenizer, --output-prefix, --max-tokens, "
                             "--keep-shards")
    options = Options(nfkc=args.nfkc, min_chars=args.min_chars, dedup=args.dedup,
                      redact_pii=args.redact_pii, text_key=args.text_key, pii=args.pii,
                      pii_locale=args.pii_locale, quality=args.quality,
                      languages=args.languages, langid=args.langid, near_dup=args.near_dup,
                      paragraph_dup=args.paragraph_dup, max_perplexity=args.max_perplexity,
                      perplexity_reference=str(args.perplexity_reference or ""),
                      dedup_against=tuple(map(str, args.dedup_against)))
    check(options)
    own = Path(f"{args.output_prefix}{dedup_index.SUFFIX}").resolve()
    if any(dedup_index.path_of(spec).resolve() == own for spec in options.dedup_against):
        raise ValueError(f"--dedup-against {own}: this run's own output, which a rerun would "
                         "drop entirely; name the earlier corpora only")
    return args, options

"""Perplexity filtering with a small reference model the user provides, after CCNet (Wenzek et
al. 2020), which keeps documents a language model of a trusted corpus finds likely.

The model is a character 5-gram model with interpolated Witten-Bell smoothing, trained in a
second or two from a reference text (``--perplexity-reference``: plain text, or JSONL/Parquet
read like the inputs): nothing is downloaded, and it needs no tokenizer or GPU. Text is
normalised first (lower case, digits to 0, whitespace runs to one space, as CCNet does), and
a document's first ``SAMPLE_CHARS`` characters are scored, so its cost stays bounded.
Perplexity is per character: in-domain prose scores low (about 5-15), other languages,
gibberish, markup and navigation boilerplate high (50-1000+). The threshold
(``--max-perplexity``) is the user's; to choose it, score a sample of the corpus:
    python -m tools.curation.perplexity --reference ref.txt sample.jsonl
prints the perplexity quantiles and the highest-scoring documents.
"""
from __future__ import annotations

import functools
import hashlib
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

ORDER = 5
SAMPLE_CHARS = 5000
MEMO_GRAMS = 1_000_000
"""Scores of the n-grams met so far (text repeats them: 5x faster), at most this many."""
_DIGIT = re.compile(r"\d")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    return _SPACE.sub(" ", _DIGIT.sub("0", text.lower())).strip()


class CharModel:
    """P(c | previous ORDER-1 characters), each order interpolated with the one below it."""

    def __init__(self, text: str) -> None:
        text = normalise(text)
        self.counts: dict[str, Counter] = defaultdict(Counter)
        for n in range(1, ORDER + 1):
            for gram, count in Counter(text[i:i + n] for i in range(len(text) - n + 1)).items():
                self.counts[gram[:-1]][gram[-1]] = count
        self.totals = {h: sum(c.values()) for h, c in self.counts.items()}
        self.uniform = 1 / (len(self.counts[""]) + 1)  # +1: a character never seen
        self._bits: dict[str, float] = {}

    def probability(self, history: str, char: str) -> float:
        p = self.uniform
        for n in range(min(len(history), ORDER - 1) + 1):
            h = history[len(history) - n:]
            seen = self.counts.get(h)
            if seen is None:
                break
            types, total = len(seen), self.totals[h]
            p = (seen[char] + types * p) / (total + types)
        return p

    def perplexity(self, text: str) -> float:
        """Per-character perplexity of the text's normalised first SAMPLE_CHARS characters."""
        sample = normalise(text[:SAMPLE_CHARS])
        if not sample:
            return math.inf
        bits, memo = 0.0, self._bits
        for i in range(len(sample)):
            gram = sample[max(i - ORDER + 1, 0):i + 1]
            b = memo.get(gram)
            if b is None:
                if len(memo) >= MEMO_GRAMS:
                    memo.clear()
                b = memo[gram] = -math.log2(self.probability(gram[:-1], gram[-1]))
            bits += b
        return 2 ** (bits / len(sample))


def reference_text(path: Path) -> str:
    """The reference corpus: a plain text file, or the texts of a JSONL/Parquet file."""
    from tools.curation.records import SUFFIXES, TextField, read_records

    if not path.name.endswith(SUFFIXES):
        return path.read_text(encoding="utf-8")
    return "\n".join(r.text for r in read_records(path, TextField()) if r.text is not None)


@functools.cache
def model(path: str) -> CharModel:
    """The model of one reference file, trained once per process (each tokenizing worker)."""
    return CharModel(reference_text(Path(path)))


def digest(path: Path) -> str:
    """The reference's contents, for a shard's source: a reference edited in place is seen."""
    stat = path.stat()
    return _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _digest(path: str, size: int, mtime_ns: int) -> str:  # once per file version, not per shard
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()


def main(argv: list[str] | None = None) -> None:
    import argparse

    from tools.curation.records import TextField, read_records

    p = argparse.ArgumentParser(prog="python -m tools.curation.perplexity",
                                description="perplexity quantiles of a sample, to set a threshold")
    p.add_argument("--reference", type=Path, required=True)
    p.add_argument("sample", type=Path, help=".jsonl or .parquet with a 'text' field")
    args = p.parse_args(argv)
    lm = CharModel(reference_text(args.reference))
    scored = sorted((lm.perplexity(r.text), r.line) for r in read_records(args.sample, TextField())
                    if r.text is not None)
    if not scored:
        raise SystemExit(f"{args.sample}: no documents")
    for q in (0.5, 0.9, 0.95, 0.99):
        print(f"p{int(q * 100):<3} {scored[min(int(q * len(scored)), len(scored) - 1)][0]:10.1f}")
    print("highest:", ", ".join(f"line {line} ({ppl:.0f})" for ppl, line in scored[-5:][::-1]))


if __name__ == "__main__":
    main()

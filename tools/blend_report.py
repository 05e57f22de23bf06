"""Effective tokens and epochs per data source for a planned run, before it is queued.

    python -m tools.blend_report data=blend_example train.steps=20000 train.global_batch_size=512

The run consumes ``train.steps * train.global_batch_size * train.seq_length`` tokens; megatron's
blend draws them in proportion to the normalised weights, from the training split of each
source. A source seen for many epochs is over-weighted (or too small); one seen for a small
fraction of an epoch could take more weight.
"""
from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from launch.config import ConfigError, compose, to_run_config
from launch.schema import RunConfig


@dataclass(frozen=True)
class SourceShare:
    path: str
    weight: float
    """Normalised: the weights of a blend sum to 1."""
    planned_tokens: int
    available_tokens: int | None
    """Tokens in the source's training split; None when its .idx is missing."""

    @property
    def epochs(self) -> float | None:
        if not self.available_tokens:
            return None
        return self.planned_tokens / self.available_tokens


def planned_tokens(cfg: RunConfig) -> int:
    t = cfg.train
    return t.steps * t.global_batch_size * t.seq_length


def train_fraction(split: str) -> float:
    parts = [float(p) for p in split.split(",")]
    return parts[0] / sum(parts)


def blend(cfg: RunConfig, source_tokens: list[int | None]) -> list[SourceShare]:
    """Pure: shares of the planned tokens, given each source's token count (None: unknown)."""
    total_weight = sum(s.weight for s in cfg.data.sources)
    fraction = train_fraction(cfg.data.split)
    return [SourceShare(path=s.path, weight=s.weight / total_weight,
                        planned_tokens=round(planned_tokens(cfg) * s.weight / total_weight),
                        available_tokens=None if n is None else round(n * fraction))
            for s, n in zip(cfg.data.sources, source_tokens)]


def count_tokens(prefix: str) -> int | None:
    """Tokens in an indexed dataset, from its .idx alone (the .bin is not read)."""
    if not Path(f"{prefix}.idx").is_file():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(prefix, mmap=False)  # held: its views die with it
        return int(dataset.sequence_lengths.sum())


def source_languages(prefix: str) -> dict[str, int] | None:
    """Tokens per language of a dataset tools.prepare_data wrote with language id on (from its
    ``<prefix>.stats.json``); None when there is no such record."""
    stats = Path(f"{prefix}.stats.json")
    if not stats.is_file():
        return None
    languages = json.loads(stats.read_text()).get("languages") or {}
    return {lang: int(v["tokens"]) for lang, v in languages.items()} or None


def planned_by_language(shares: list[SourceShare],
                        languages: list[dict[str, int] | None]) -> dict[str, int]:
    """Pure: the planned tokens per language, each source's share split as its tokens are;
    a source without a language record counts as "unknown"."""
    out: dict[str, float] = {}
    for share, langs in zip(shares, languages):
        total = sum(langs.values()) if langs else 0
        for lang, tokens in (langs.items() if total else [("unknown", 1)]):
            fraction = tokens / total if total else 1.0
            out[lang] = out.get(lang, 0.0) + share.planned_tokens * fraction
    return {k: round(v) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def format_languages(by_language: dict[str, int]) -> str:
    total = sum(by_language.values()) or 1
    lines = [f"{'language':<10} {'planned tokens':>16} {'share':>7}"]
    lines += [f"{lang:<10} {n:>16,} {n / total:>7.1%}" for lang, n in by_language.items()]
    return "\n".join(lines)


def format_table(shares: list[SourceShare], total: int) -> str:
    width = max(len(s.path) for s in shares)
    lines = [f"planned run: {total:,} tokens", f"{'source':<{width}} {'weight':>7} "
             f"{'planned tokens':>16} {'train tokens':>16} {'epochs':>8}"]
    for s in shares:
        available = "missing" if s.available_tokens is None else f"{s.available_tokens:,}"
        epochs = "-" if s.epochs is None else f"{s.epochs:.2f}"
        lines.append(f"{s.path:<{width}} {s.weight:>7.3f} {s.planned_tokens:>16,} "
                     f"{available:>16} {epochs:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    try:
        cfg = to_run_config(compose(overrides))
    except (ConfigError, ValueError) as err:
        print(f"blend_report: {err}", file=sys.stderr)
        return 1
    if cfg.data.kind != "indexed" or not cfg.data.sources:
        print("blend_report: the composed data config has no indexed sources", file=sys.stderr)
        return 1
    shares = blend(cfg, [count_tokens(s.path) for s in cfg.data.sources])
    print(format_table(shares, planned_tokens(cfg)))
    languages = [source_languages(s.path) for s in cfg.data.sources]
    if any(languages):
        print(format_languages(planned_by_language(shares, languages)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

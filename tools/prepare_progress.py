"""Progress and the final report of tools.prepare_data: what the user sees, nothing else."""
from __future__ import annotations

import sys
import time
from typing import Any

_LINE_EVERY_S = 5.0


class Progress:
    """A tqdm bar on stderr when tqdm is installed, else one plain line every few seconds."""

    def __init__(self) -> None:
        self.docs = self.tokens = 0
        self._started = self._last = time.monotonic()
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(unit=" docs", file=sys.stderr, dynamic_ncols=True)

    def __enter__(self) -> "Progress":
        return self

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        now = time.monotonic()
        rate = self.tokens / max(now - self._started, 1e-9)
        if self._bar is not None:
            self._bar.update(docs)
            self._bar.set_postfix_str(f"{self.tokens:,} tokens, {rate:,.0f} tokens/s",
                                      refresh=False)
        elif now - self._last >= _LINE_EVERY_S:
            self._last = now
            print(f"prepare_data: {self.docs:,} docs, {self.tokens:,} tokens, {rate:,.0f} tokens/s",
                  file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    width = max(len(str(r[0])) for r in [header, *rows])
    fmt = lambda v: f"{v:>12,}" if isinstance(v, int) else f"{v:>12}"  # noqa: E731
    return [f"{str(r[0]):<{width}} " + " ".join(fmt(v) for v in r[1:]) for r in [header, *rows]]


def _files(report: dict[str, Any]) -> list[str]:
    pii = list(report["total"])[len(("documents", "kept", "duplicates", "too_short",
                                     "tokens")):]
    cols = ("documents", "malformed", "kept", "duplicates", "near_duplicates", "too_short",
            *pii, "tokens")
    value = lambda r, c: sum(r["malformed"].values()) if c == "malformed" else r.get(c, 0)  # noqa
    rows = [(r["file"] + (" (reused)" if r.get("skipped") else ""), *(value(r, c) for c in cols))
            for r in report["files"]]
    rows.append(("total", *(sum(value(r, c) for r in report["files"]) for c in cols)))
    return _table(("file", *(c.replace("_duplicates", "_dups") for c in cols)), rows)


def _curation(report: dict[str, Any]) -> list[str]:
    lines = ["", *_table(("stage", "in", "out", "retention %"),
                         [(s["stage"], s["in"], s["out"], f"{s['retention_pct']:.2f}")
                          for s in report["stages"]])]
    if report["languages"]:
        lines += ["", *_table(("language", "documents", "tokens", "tokens %"),
                              [(k, v["documents"], v["tokens"], f"{v['token_share_pct']:.2f}")
                               for k, v in report["languages"].items()])]
    if report["pii"]:
        lines += ["", *_table(("pii class", "hits", "documents", "docs %"),
                              [(k, v["hits"], v["documents"], f"{v['document_rate_pct']:.3f}")
                               for k, v in report["pii"].items()])]
    for reason, n in report["dropped"].items():
        lines.append(f"dropped {n:,}: {reason}")
    clusters = report["clusters"]
    if clusters["exact"] or clusters["near"] or clusters["earlier"]:
        lines.append(f"duplicate clusters: {clusters['exact']:,} exact, {clusters['near']:,} "
                     f"near, {clusters['earlier']:,} of earlier corpora "
                     f"({', '.join(report['dedup_against']) or 'none named'}); "
                     "largest (canonical copy kept):")
        lines += [f"  {c['canonical']} ({c['kind']}): {c['copies_dropped']:,} copies dropped"
                  for c in clusters["largest"][:5]]
    paragraphs = report["paragraphs"]
    if paragraphs:
        lines.append(f"paragraphs removed: {paragraphs['removed']:,} "
                     f"({paragraphs['characters_removed']:,} characters, "
                     f"{paragraphs['characters_removed_pct']:.2f}% of those read) in "
                     f"{paragraphs['clusters']:,} clusters; largest (first copy kept):")
        lines += [f"  {c['canonical']}: {c['copies_removed']:,} copies removed"
                  for c in paragraphs["largest"][:5]]
    for reason, n in report["malformed"].items():
        lines.append(f"malformed {n:,}: {reason}")
    lines += [f"  {e}" for r in report["files"] for e in r["malformed_examples"]]
    return lines


def format_report(report: dict[str, Any]) -> str:
    """Per input file: documents, drops and tokens; then retention per stage, languages, PII,
    duplicate clusters and the malformed records by file and line."""
    lines = _files(report) + _curation(report)
    seconds = report["seconds"]
    new_tokens = sum(r["tokens"] for r in report["files"] if not r.get("skipped"))
    lines.append(f"wrote {report['output_prefix']}.bin/.idx ({report['dtype']}) in "
                 f"{seconds:.1f} s: "
                 f"{new_tokens / max(seconds, 1e-9):,.0f} tokens/s tokenized with "
                 f"{report['workers']} worker(s)")
    return "\n".join(lines)

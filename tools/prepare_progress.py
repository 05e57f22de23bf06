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


def format_report(report: dict[str, Any]) -> str:
    """A table of tokens and filter counts per input file, then the totals."""
    cols = ("documents", "kept", "duplicates", "too_short", "email", "phone", "tokens")
    rows = [(r["file"] + (" (reused)" if r.get("skipped") else ""), *(r[c] for c in cols))
            for r in report["files"]]
    rows.append(("total", *(report["total"][c] for c in cols)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'file':<{width}} " + " ".join(f"{c:>12}" for c in cols)]
    lines += [f"{r[0]:<{width}} " + " ".join(f"{v:>12,}" for v in r[1:]) for r in rows]
    seconds = report["seconds"]
    new_tokens = sum(r["tokens"] for r in report["files"] if not r.get("skipped"))
    lines.append(f"wrote {report['output_prefix']}.bin/.idx ({report['dtype']}) in "
                 f"{seconds:.1f} s: "
                 f"{new_tokens / max(seconds, 1e-9):,.0f} tokens/s tokenized with "
                 f"{report['workers']} worker(s)")
    return "\n".join(lines)

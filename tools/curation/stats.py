"""The run's metrics and provenance, for ``<prefix>.stats.json`` and the printed report:
per file and in total, retention per stage, duplicate clusters with their canonical copy,
PII hits by class, malformed records by reason, documents and tokens per language.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy

from tools.curation import paragraphs
from tools.curation.paragraphs import Plan
from tools.curation.selection import TOP_CLUSTERS, Selection

TOTAL_KEYS = ("documents", "kept", "duplicates", "too_short", "tokens")


def file_row(path: Path, summary: dict[str, Any], docs: dict[str, numpy.ndarray],
             keep: numpy.ndarray, selected: dict[str, int]) -> dict[str, Any]:
    """One input file's counts, over the documents the corpus-wide selection kept;
    ``selected``: its documents dropped by each corpus-wide stage (and paragraphs removed)."""
    kept_tokens = docs["tokens"][keep]
    row = {"file": str(path), "shard": summary["shard"], "documents": summary["documents"],
           "malformed": dict(summary["malformed"]), "dropped": dict(summary["dropped"]),
           "too_short": summary["dropped"].get("too short", 0), **selected,
           "kept": int(keep.sum()), "tokens": int(kept_tokens.sum()),
           "malformed_examples": summary["malformed_examples"]}
    pii = docs["pii"][keep]
    row["pii"] = {str(c): int(pii[:, i].sum()) for i, c in enumerate(docs["pii_classes"])}
    row["pii_documents"] = {str(c): int((pii[:, i] > 0).sum())
                            for i, c in enumerate(docs["pii_classes"])}
    row.update(row["pii"])
    languages: dict[str, dict[str, int]] = {}
    for lang, tokens in zip(docs["language"][keep], kept_tokens):
        if lang:
            entry = languages.setdefault(str(lang), {"documents": 0, "tokens": 0})
            entry["documents"] += 1
            entry["tokens"] += int(tokens)
    row["languages"] = languages
    return row


def _sum(rows: list[dict[str, Any]], key: str) -> Counter:
    total: Counter = Counter()
    for r in rows:
        total.update(r[key])
    return total


def stages(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Documents into and out of each stage, in pipeline order, with the retention in %."""
    dropped, malformed = _sum(rows, "dropped"), sum(sum(r["malformed"].values()) for r in rows)
    steps = [("read", 0), ("well-formed", malformed),
             ("paragraph dedup", dropped[paragraphs.DROP_REASON]),
             ("length", dropped["too short"]),
             ("language", dropped["language"]),
             ("quality", sum(n for k, n in dropped.items() if k.startswith("quality"))),
             ("perplexity", dropped["perplexity"]),
             ("pii (dropped)", sum(n for k, n in dropped.items() if k.startswith("pii"))),
             ("earlier corpora", sum(r["earlier_duplicates"] for r in rows)),
             ("exact dedup", sum(r["duplicates"] for r in rows)),
             ("near dedup", sum(r["near_duplicates"] for r in rows))]
    out, docs = [], sum(r["documents"] for r in rows)
    for name, removed in steps:
        kept = docs - removed
        out.append({"stage": name, "in": docs, "out": kept,
                    "retention_pct": round(100 * kept / docs, 2) if docs else 100.0})
        docs = kept
    return out


def languages(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    total: dict[str, dict[str, Any]] = {}
    for r in rows:
        for lang, counts in r["languages"].items():
            entry = total.setdefault(lang, {"documents": 0, "tokens": 0})
            entry["documents"] += counts["documents"]
            entry["tokens"] += counts["tokens"]
    tokens = sum(e["tokens"] for e in total.values()) or 1
    for entry in total.values():
        entry["token_share_pct"] = round(100 * entry["tokens"] / tokens, 2)
    return dict(sorted(total.items(), key=lambda kv: -kv[1]["tokens"]))


def clusters(selection: Selection, files: list[str], earlier: list[str]) -> dict[str, Any]:
    """Duplicate clusters by kind, the largest named by their canonical copy: file:line, or
    for an earlier corpus its index file and document number."""
    top = selection.clusters.most_common(TOP_CLUSTERS)
    where = lambda kind, s, line: (f"{earlier[s]}#{line}" if kind == "earlier"  # noqa: E731
                                   else f"{files[s]}:{line}")
    return {**{kind: sum(1 for k in selection.clusters if k[0] == kind)
               for kind in ("exact", "near", "earlier")},
            "largest": [{"kind": kind, "canonical": where(kind, s, line), "copies_dropped": n}
                        for (kind, s, line), n in top]}


def paragraph_summary(plan: Plan | None, files: list[str]) -> dict[str, Any]:
    """Paragraphs removed, their characters (and share of all characters read), clusters."""
    if plan is None:
        return {}
    chars = sum(plan.characters)
    return {"removed": sum(plan.removed), "characters_removed": chars,
            "characters_removed_pct": round(100 * chars / max(plan.read_characters, 1), 2),
            "clusters": len(plan.clusters),
            "largest": [{"canonical": f"{files[f]}:{line} paragraph {p + 1}", "copies_removed": n}
                        for (f, line, p), n in plan.clusters.most_common(TOP_CLUSTERS)]}


def summarise(rows: list[dict[str, Any]], selection: Selection, plan: Plan | None = None,
              earlier: list[str] = ()) -> dict[str, Any]:
    """The report's corpus-wide part (beside ``files``)."""
    kept = sum(r["kept"] for r in rows) or 1
    pii, pii_docs = _sum(rows, "pii"), _sum(rows, "pii_documents")
    total = {k: sum(r[k] for r in rows) for k in TOTAL_KEYS} | dict(pii)
    return {"total": total, "stages": stages(rows), "languages": languages(rows),
            "pii": {c: {"hits": pii[c], "documents": pii_docs[c],
                        "document_rate_pct": round(100 * pii_docs[c] / kept, 3)} for c in pii},
            "malformed": dict(_sum(rows, "malformed")), "dropped": dict(_sum(rows, "dropped")),
            "clusters": clusters(selection, [r["file"] for r in rows], list(earlier)),
            "paragraphs": paragraph_summary(plan, [r["file"] for r in rows]),
            "dedup_against": list(earlier)}

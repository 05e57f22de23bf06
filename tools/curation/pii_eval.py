"""Precision and recall of the PII detectors on a labelled corpus (JSONL: ``text``,
``locale``, ``pii``: [{"class", "value"}]), per data class. Used by the tests, which hold
them to a floor, and by benchmarks/pii_detectors.py, which prints them."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tools.curation import pii


def evaluate(corpus: Path) -> dict[str, dict[str, Any]]:
    """Per class: true/false positives, misses, precision, recall, and the mistakes made."""
    counts: dict[str, Counter] = {c: Counter() for c in pii.CLASSES}
    mistakes: dict[str, list[str]] = {c: [] for c in pii.CLASSES}
    everything = ",".join(f"{c}=redact" for c in pii.CLASSES)
    for line in corpus.read_text().splitlines():
        case = json.loads(line)
        policy = pii.Policy.parse(everything, case["locale"])
        found = Counter((h.kind, case["text"][h.start:h.end])
                        for h in pii.detect(case["text"], policy))
        wanted = Counter((p["class"], p["value"]) for p in case["pii"])
        for (kind, value), n in (found | wanted).items():
            hit = min(found[(kind, value)], wanted[(kind, value)])
            counts[kind].update(tp=hit, fp=found[(kind, value)] - hit,
                                fn=wanted[(kind, value)] - hit)
            if found[(kind, value)] != wanted[(kind, value)]:
                label = "false positive" if found[(kind, value)] > hit else "missed"
                mistakes[kind].append(f"{label}: {value!r} ({case['locale']})")
    return {kind: {"tp": c["tp"], "fp": c["fp"], "fn": c["fn"],
                   "precision": c["tp"] / max(c["tp"] + c["fp"], 1),
                   "recall": c["tp"] / max(c["tp"] + c["fn"], 1), "mistakes": mistakes[kind]}
            for kind, c in counts.items()}

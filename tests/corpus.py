"""Small corpora the data-preparation tests write."""
from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, texts: list[str]) -> Path:
    """One ``{"text": ...}`` record a line, the pre-training input format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path

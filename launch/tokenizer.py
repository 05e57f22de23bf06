"""Where a tokenizer lives and which token ends a document: one rule for data preparation,
training and the Hugging Face export, so the ids written, trained on and exported agree.

Stdlib only at import; Hugging Face ``tokenizers`` is loaded by ``load_tokenizer`` alone.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
"""End-of-document tokens tried in order when the tokenizer directory names no eos_token."""


def tokenizer_file(path: Path) -> Path:
    """``tokenizer.json`` itself, or the one inside a Hugging Face tokenizer/model directory."""
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return file


def eod_id(tokenizer: Any, path: Path) -> int:
    """The end-of-document id: tokenizer_config.json's eos_token, else a well-known name."""
    config = tokenizer_file(path).parent / "tokenizer_config.json"
    names = list(EOD_CANDIDATES)
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        names.insert(0, eos.get("content") if isinstance(eos, dict) else eos)
    for name in names:
        if name and tokenizer.token_to_id(name) is not None:
            return tokenizer.token_to_id(name)
    raise ValueError(f"{path}: no end-of-document token (tried {', '.join(map(str, names))})")


def load_tokenizer(path: Path) -> tuple[Any, int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file(path)))
    return tokenizer, eod_id(tokenizer, path)

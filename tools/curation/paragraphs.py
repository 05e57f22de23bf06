"""Paragraph-level near-duplicate removal: boilerplate repeated across documents (license
headers, cookie notices, navigation blocks) is removed from every document but the first that
holds it, as CCNet does (Wenzek et al. 2020), here with MinHash-LSH so a notice with one word
changed is caught too.

A paragraph is a run of text between blank lines. Which paragraphs go is planned before any
shard is written, in one pass over every file in input order (``Plan``): the decision is a
function of the corpus only, so a rerun that reuses shards removes what a fresh run removes,
and a shard's source names the paragraphs removed from its file (``digest``). Each file's
fingerprints are stored beside its shard (``save``/``load``), so planning a rerun reads and
hashes only the files that changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy

from tools.curation import minhash
from tools.text_filters import dedup_key

MIN_CHARS = 40
"""Shorter paragraphs (headings, a closing brace, "Thanks!") are never removed: repeating
them is no boilerplate, and removing them would tear documents apart."""
DROP_REASON = "paragraph dedup"
"""A document whose every paragraph repeated an earlier one is dropped with this reason."""
_BREAK = re.compile(r"\n[^\S\n]*\n\s*")

Fingerprint = tuple[int, int, bytes, numpy.ndarray]
"""(paragraph index, characters, 16-byte exact key, MinHash signature) of one paragraph."""


def spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each paragraph, blank-line separators excluded."""
    out, start = [], 0
    for m in _BREAK.finditer(text):
        out.append((start, m.start()))
        start = m.end()
    out.append((start, len(text)))
    return out


def fingerprints(text: str) -> list[Fingerprint]:
    """Key and signature of each paragraph long enough to be removed."""
    out = []
    for i, (a, b) in enumerate(spans(text)):
        paragraph = text[a:b]
        if len(paragraph.strip()) >= MIN_CHARS:
            out.append((i, len(paragraph), dedup_key(paragraph), minhash.signature(paragraph)))
    return out


def remove(text: str, drop: tuple[int, ...]) -> str:
    """``text`` without the paragraphs ``drop`` names, each with the separator after it (the
    one before it, for the last paragraph)."""
    cuts = spans(text)
    keep = [i for i in range(len(cuts)) if i not in set(drop)]
    if not keep:
        return ""
    pieces = [text[:cuts[0][0]]]  # leading blank lines stay as they were
    for n, i in enumerate(keep):
        a, b = cuts[i]
        pieces.append(text[a:b])
        if n + 1 < len(keep):
            pieces.append(text[b:cuts[i + 1][0]])  # the separator that followed it
    return "".join(pieces) + text[cuts[-1][1]:]


Document = tuple[int, int, list[Fingerprint]]
"""(line, characters, fingerprints) of one document."""


def save(path: Path, documents: list[Document], source: dict[str, Any]) -> None:
    """One file's fingerprints, so a rerun plans without reading and hashing it again."""
    prints = [(d, *f) for d, (_, _, fs) in enumerate(documents) for f in fs]
    column = lambda i: numpy.array([p[i] for p in prints], numpy.int64)  # noqa: E731
    arrays = {"line": numpy.array([d[0] for d in documents], numpy.int64),
              "chars": numpy.array([d[1] for d in documents], numpy.int64),
              "owner": column(0), "index": column(1), "length": column(2),
              "key": numpy.frombuffer(b"".join(p[3] for p in prints), numpy.uint8).reshape(-1, 16),
              "signature": numpy.array([p[4] for p in prints], numpy.uint32).reshape(
                  -1, minhash.NUM_PERM),
              "source": numpy.array(json.dumps(source))}
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        numpy.savez(f, **arrays)
    os.replace(tmp, path)


def load(path: Path, source: dict[str, Any]) -> list[Document] | None:
    """The fingerprints ``save`` stored, or None when there are none for this ``source``."""
    if not path.is_file():
        return None
    with numpy.load(path) as data:
        if str(data["source"]) != json.dumps(source):
            return None
        a = {k: data[k] for k in data.files}
    docs: list[Document] = [(int(n), int(c), []) for n, c in zip(a["line"], a["chars"])]
    for owner, index, length, key, signature in zip(a["owner"], a["index"], a["length"],
                                                    a["key"], a["signature"]):
        docs[owner][2].append((int(index), int(length), key.tobytes(), signature))
    return docs


@dataclass
class Plan:
    """Which paragraphs each document loses, decided in input order (first copy kept)."""

    threshold: float
    drops: list[dict[int, tuple[int, ...]]] = field(default_factory=list)
    """Per file: line -> indices of the paragraphs removed from that document."""
    removed: list[int] = field(default_factory=list)
    characters: list[int] = field(default_factory=list)
    """Per file: paragraphs removed and their characters."""
    clusters: Counter = field(default_factory=Counter)
    """(file, line, paragraph) of a canonical copy -> copies removed in its favour."""
    read_characters: int = 0
    """Characters of every well-formed document, for the share removed."""

    def __post_init__(self) -> None:
        self._exact: dict[bytes, int] = {}
        self._near = minhash.NearDuplicates(self.threshold)
        self._where: list[tuple[int, int, int]] = []

    def add_file(self, documents: list[Document]) -> None:
        """One file's documents, (line, characters, fingerprints), in order."""
        file, drops, removed, chars = len(self.drops), {}, 0, 0
        for line, length, prints in documents:
            self.read_characters += length
            gone = []
            for index, length, key, signature in prints:
                canonical = self._exact.get(key)
                if canonical is None:
                    canonical = self._near.canonical(len(self._where), signature)
                if canonical is None:
                    self._exact[key] = len(self._where)
                    self._where.append((file, line, index))
                    continue
                gone.append(index)
                self.clusters[self._where[canonical]] += 1
                chars += length
            if gone:
                drops[line] = tuple(gone)
                removed += len(gone)
        self.drops.append(drops)
        self.removed.append(removed)
        self.characters.append(chars)

    def digest(self, file: int) -> str:
        """What is removed from one file's documents, for its shard's source."""
        text = repr(sorted(self.drops[file].items()))
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

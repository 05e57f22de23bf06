"""Paragraph-level near-duplicate removal: boilerplate repeated across documents (license
headers, cookie notices, navigation blocks) is removed from every document but the first that
holds it, as CCNet does (Wenzek et al. 2020), here with MinHash-LSH so a notice with one word
changed is caught too.

A paragraph is a run of text between blank lines. Which paragraphs go is planned before any
shard is written, in one pass over every file in input order (``Plan``): the decision is a
function of the corpus only, so a rerun that reuses shards removes what a fresh run removes,
and a shard's source names the paragraphs removed from its file (``digest``).
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

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

    def add_file(self, documents: list[tuple[int, int, list[Fingerprint]]]) -> None:
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

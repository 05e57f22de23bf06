"""MinHash signatures of documents (datasketch), for near-duplicate detection.

A document's shingles are its 5-word windows (lower-cased); a text with fewer words (or a
script without spaces) uses 5-character windows instead. Signatures are computed in the
tokenizing workers and stored per shard, so the corpus-wide LSH pass can run over every
shard, reused or new, in input order.
"""
from __future__ import annotations

import functools
import re

import numpy

NUM_PERM = 64
"""Permutations per signature: 256 bytes a document; with the LSH bands chosen by datasketch,
a Jaccard threshold of 0.8 separates near-duplicates from related documents."""
SHINGLE = 5
SEED = 1
SCHEME = "affine32"  # datasketch 2.0's default, named: stored signatures must stay comparable
_WORD = re.compile(r"\w+")


@functools.cache
def _template():  # noqa: ANN202 - an empty MinHash whose permutations the others share
    from datasketch import MinHash

    return MinHash(num_perm=NUM_PERM, seed=SEED, scheme=SCHEME)


def shingles(text: str) -> set[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) >= SHINGLE and len(words) * 20 >= len(text) / 10:
        return {" ".join(words[i:i + SHINGLE]).encode() for i in range(len(words) - SHINGLE + 1)}
    chars = "".join(words) or text
    return {chars[i:i + SHINGLE].encode() for i in range(max(len(chars) - SHINGLE + 1, 1))}


def signature(text: str) -> numpy.ndarray:
    """The document's MinHash hash values (NUM_PERM uint32)."""
    from datasketch import MinHash

    template = _template()
    m = MinHash(num_perm=NUM_PERM, seed=SEED, permutations=template.permutations,
                scheme=SCHEME)
    m.update_batch(list(shingles(text)))
    return m.hashvalues.astype(numpy.uint32)


class NearDuplicates:
    """Locality-sensitive hashing over the signatures of documents kept so far."""

    def __init__(self, threshold: float) -> None:
        from datasketch import MinHashLSH

        self.threshold = threshold
        self._lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self._kept: dict[int, numpy.ndarray] = {}

    def canonical(self, doc: int, hashvalues: numpy.ndarray) -> int | None:
        """The earliest kept document ``doc`` nearly duplicates (estimated Jaccard at or above
        the threshold), or None, in which case ``doc`` is kept and indexed."""
        m = self._lean(hashvalues)
        for other in sorted(self._lsh.query(m)):
            if numpy.mean(self._kept[other] == hashvalues) >= self.threshold:
                return other
        self._lsh.insert(doc, m)
        self._kept[doc] = hashvalues
        return None

    def add(self, doc: int, hashvalues: numpy.ndarray) -> None:
        """Index ``doc`` without a query: a document of an earlier corpus."""
        self._lsh.insert(doc, self._lean(hashvalues))
        self._kept[doc] = hashvalues

    @staticmethod
    def _lean(hashvalues: numpy.ndarray):  # noqa: ANN205 - datasketch's LeanMinHash
        from datasketch import LeanMinHash

        return LeanMinHash(seed=SEED, hashvalues=hashvalues, scheme=SCHEME)

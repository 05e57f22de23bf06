"""Corpus-wide selection: which shard documents survive exact and near-duplicate dedup, and
the merge of the survivors into one Megatron dataset.

Decisions are a function of the documents' keys and signatures in input order only (the
first occurrence is the canonical copy), never of which shards a run wrote and which it
reused: a rerun after any change gives what a fresh run gives.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from tools.curation.minhash import NearDuplicates
from tools.curation.shards import builder_class

TOP_CLUSTERS = 20
"""Largest duplicate clusters named in the report (canonical copy and number of copies)."""


@dataclass
class Selection:
    keep: list[numpy.ndarray]
    """Per shard, which of its documents go to the output."""
    duplicates: list[int]
    near_duplicates: list[int]
    earlier: list[int] = field(default_factory=list)
    """Per shard, documents dropped as (near) copies of an earlier corpus's."""
    clusters: Counter = field(default_factory=Counter)
    """(kind, shard, line) of the canonical copy -> copies dropped in its favour; for kind
    "earlier": (kind, index of the earlier corpus, its document number)."""


def _seed(earlier: list[dict[str, numpy.ndarray]], seen: dict[bytes, tuple],
          near: NearDuplicates | None, where: list[tuple]) -> None:
    """The earlier corpora's documents, as canonical copies met before any of ours."""
    for e, index in enumerate(earlier):
        for i, key in enumerate(index.get("key", [])):
            seen.setdefault(key.tobytes(), ("earlier", e, i))
        for i, hashvalues in enumerate(index.get("signature", []) if near else []):
            near.add(len(where), hashvalues)
            where.append(("earlier", e, i))


def select(docs: list[dict[str, numpy.ndarray]], dedup: bool, near_dup: float,
           earlier: list[dict[str, numpy.ndarray]] = ()) -> Selection:
    """Exact dedup on the 16-byte keys, then MinHash-LSH over what is left, in input order;
    ``earlier``: dedup indexes (tools/curation/dedup_index.py) whose documents come first."""
    seen: dict[bytes, tuple] = {}
    near = NearDuplicates(near_dup) if near_dup > 0 else None
    where: list[tuple] = []  # near-dup index -> (kind, shard, line)
    _seed(list(earlier), seen, near, where)
    out = Selection([], [], [])
    for s, d in enumerate(docs):
        keep = numpy.ones(len(d["line"]), dtype=bool)
        dropped: Counter = Counter()
        for i in range(len(keep)) if (dedup or near) else ():
            line, first = int(d["line"][i]), None
            if dedup:
                first = seen.setdefault(d["key"][i].tobytes(), ("exact", s, line))
                first = None if first == ("exact", s, line) else first
            if first is None and near is not None and "signature" in d:
                other = near.canonical(len(where), d["signature"][i])
                if other is None:
                    where.append(("near", s, line))
                first = None if other is None else where[other]
            if first is not None:
                keep[i] = False
                dropped[first[0]] += 1
                out.clusters[first] += 1
        out.keep.append(keep)
        out.duplicates.append(dropped["exact"])
        out.near_duplicates.append(dropped["near"])
        out.earlier.append(dropped["earlier"])
    return out


def merge(shards: list[Path], keep: list[numpy.ndarray], prefix: Path, dtype: type) -> None:
    """The kept documents, in input order, into ``prefix``.bin/.idx (replaced atomically); a
    shard that keeps everything is appended whole (megatron's add_index)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    tmp = Path(f"{prefix}.merging")
    builder = builder_class()(f"{tmp}.bin", dtype=dtype)
    for shard, mask in zip(shards, keep):
        if mask.all():
            builder.add_index(str(shard))
            continue
        dataset = IndexedDataset(str(shard))
        for i in numpy.flatnonzero(mask):
            ids = dataset[int(i)]
            builder.add_document(ids, [len(ids)])
        del dataset
    builder.finalize(f"{tmp}.idx")
    for ext in (".bin", ".idx"):
        os.replace(f"{tmp}{ext}", f"{prefix}{ext}")

"""``<prefix>.dedup.npz``: what a later corpus needs to exclude this one's documents.

Written beside every output prepared with ``--dedup`` or ``--near-dup``: one row per document
in the output, in its order (row i is document i of ``<prefix>.bin``):
- ``key``: (n, 16) uint8, the exact-dedup key (blake2b-128 of the NFKC, case-folded,
  whitespace-collapsed text; tools/text_filters.py ``dedup_key``), only with ``--dedup``;
- ``signature``: (n, 64) uint32, the MinHash signature (tools/curation/minhash.py), only when
  the corpus was prepared with ``--near-dup``;
- ``meta``: JSON naming both schemes, so signatures made another way are refused, not compared.
``--dedup-against <prefix or .dedup.npz>`` loads it (16 bytes a document for keys, 256 more
for signatures, held in memory with the LSH index).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy

from tools.curation import minhash

SUFFIX = ".dedup.npz"
META = {"key": "blake2b-128 of NFKC casefold whitespace-collapsed text",
        "minhash": {"num_perm": minhash.NUM_PERM, "seed": minhash.SEED,
                    "scheme": minhash.SCHEME, "shingle": minhash.SHINGLE}}


def path_of(spec: str) -> Path:
    """The index a ``--dedup-against`` value names (a prefix or the file itself); ValueError
    naming the flag when there is none."""
    path = Path(spec if spec.endswith(SUFFIX) else f"{spec}{SUFFIX}")
    if not path.is_file():
        raise ValueError(f"--dedup-against {spec}: no {path}; expected the --output-prefix of "
                         f"a corpus prepared with --dedup (or its {SUFFIX} file)")
    return path


def write(prefix: Path, docs: list[dict[str, numpy.ndarray]], keep: list[numpy.ndarray],
          keys: bool, signatures: bool) -> Path:
    """The kept documents' keys and/or signatures in output order, replaced atomically (keys
    exist only with --dedup: without it a shard stores zeros)."""
    arrays = {"meta": numpy.array(json.dumps(META))}
    if keys:
        arrays["key"] = numpy.concatenate([d["key"][k] for d, k in zip(docs, keep)]
                                          or [numpy.zeros((0, 16), numpy.uint8)])
    if signatures:
        arrays["signature"] = numpy.concatenate(
            [d["signature"][k] for d, k in zip(docs, keep) if "signature" in d]
            or [numpy.zeros((0, minhash.NUM_PERM), numpy.uint32)])
    out, tmp = Path(f"{prefix}{SUFFIX}"), Path(f"{prefix}.dedup.tmp")
    with open(tmp, "wb") as f:
        numpy.savez(f, **arrays)
    os.replace(tmp, out)
    return out


def load(path: Path) -> dict[str, numpy.ndarray]:
    """An index written by ``write``; ValueError when its MinHash scheme is not ours."""
    with numpy.load(path) as data:
        index = {k: data[k] for k in data.files}
    meta = json.loads(str(index.pop("meta")))
    if "signature" in index and meta.get("minhash") != META["minhash"]:
        raise ValueError(f"--dedup-against {path}: MinHash {meta.get('minhash')} differs from "
                         f"this version's {META['minhash']}; prepare it again")
    return index

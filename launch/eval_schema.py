"""Validation during training: which held-out data each evaluation reads, and its checks.

Stdlib only, so the login node (checks, dry run), the ranks (``megatron_ext.validation``) and
the start alert agree on one list of sources. Each blend source contributes its validation split
(``data.split``'s middle part, megatron's split rule); each ``data.validation`` entry is read
whole. The problems name the field, before anything is queued.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launch.schema import RunConfig

WHOLE = "0,1,0"
"""The split under which megatron reads a whole ``data.validation`` dataset as validation."""

_IDX_MAGIC = b"MMIDIDX\x00\x00"  # megatron/core/datasets/indexed_dataset.py _INDEX_HEADER


@dataclass(frozen=True)
class EvalSource:
    """One validation loss: ``val/<name>/loss`` in metrics.jsonl and W&B."""

    name: str
    field: str
    """The config field naming its data, for messages (``data.sources[0].path``)."""
    path: str
    """Indexed dataset prefix; '' for synthetic data."""
    split: str
    """The megatron split string whose validation part is read."""


def validation_fraction(split: str) -> float:
    """The middle part of a ``train,valid,test`` split, normalised (megatron's rule)."""
    parts = [float(p) for p in split.split(",")]
    return parts[1] / sum(parts) if sum(parts) > 0 else 0.0


def validation_sequences(split: str, sequences: int) -> int:
    """How many of a dataset's sequences megatron puts in its validation split: the bookends
    ``round(lo * n)`` and ``round(hi * n)`` (``_build_megatron_dataset_splits``)."""
    parts = [float(p) for p in split.split(",")]
    lo, hi = parts[0] / sum(parts), (parts[0] + parts[1]) / sum(parts)
    return int(round(hi * sequences)) - int(round(lo * sequences))


def _name(path: str, taken: set[str]) -> str:
    base = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(path).name) or "source"
    name, n = base, 1
    while name in taken or name == "loss" or name == "time_s":  # the overall keys
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def eval_sources(cfg: RunConfig) -> list[EvalSource]:
    """What every evaluation reads, in order; empty when validation is off."""
    if cfg.train.eval_interval <= 0:
        return []
    data, out, taken = cfg.data, [], set()
    if validation_fraction(data.split) > 0:
        if data.kind == "synthetic":
            out.append(EvalSource(_name("synthetic", taken), "data.split", "", data.split))
        out += [EvalSource(_name(s.path, taken), f"data.sources[{i}].path", s.path, data.split)
                for i, s in enumerate(data.sources) if data.kind in ("indexed", "sft")]
    out += [EvalSource(_name(s.path, taken), f"data.validation[{i}].path", s.path, WHOLE)
            for i, s in enumerate(data.validation)]
    return out


def eval_problems(cfg: RunConfig) -> list[str]:
    """Config-only rules (no files read): the interval and batch count, and data to read."""
    t, data = cfg.train, cfg.data
    out = [f"train.{name}={getattr(t, name)} must be >= 0"
           for name in ("eval_interval", "eval_iters") if getattr(t, name) < 0]
    if out:
        return out
    if t.eval_iters > 0 and t.eval_interval == 0:
        out.append(f"train.eval_iters={t.eval_iters} needs train.eval_interval > 0 (steps between "
                   "validations; 0 turns validation off)")
    if t.eval_interval > 0 and t.eval_iters == 0:
        out.append(f"train.eval_interval={t.eval_interval} needs train.eval_iters > 0 (global "
                   "batches of each validation source per evaluation)")
    if data.validation and data.kind != "indexed":
        out.append(f"data.validation needs data.kind=indexed (it lists indexed datasets); "
                   f"data.kind={data.kind}")
    if t.eval_interval > 0 and not data.validation and validation_fraction(data.split) == 0:
        out.append(f"train.eval_interval={t.eval_interval} needs validation data: data.split="
                   f"{data.split!r} reserves none (its middle part) and data.validation is empty")
    return out


def sequence_count(idx_path: Path) -> Optional[int]:
    """The sequence count in a megatron ``.idx`` header; None when it is no such file."""
    with open(idx_path, "rb") as f:
        head = f.read(len(_IDX_MAGIC) + 8 + 1 + 8)
    if len(head) < len(_IDX_MAGIC) + 17 or not head.startswith(_IDX_MAGIC):
        return None
    return struct.unpack("<Q", head[len(_IDX_MAGIC) + 9:])[0]


def eval_data_problems(cfg: RunConfig) -> list[str]:
    """Each validation dataset exists and its validation split holds sequences (login node)."""
    out = []
    for source in eval_sources(cfg):
        if not source.path:
            continue
        missing = [ext for ext in (".bin", ".idx") if not Path(source.path + ext).exists()]
        if missing:
            if source.field.startswith("data.validation"):  # the sources' own check says it
                out.append(f"{source.field}={source.path}: {source.path}{missing[0]} does not "
                           "exist (a megatron indexed dataset is <prefix>.bin and <prefix>.idx; "
                           "build it with python -m tools.prepare_data)")
            continue
        count = sequence_count(Path(source.path + ".idx"))
        if count is not None and validation_sequences(source.split, count) == 0:
            held = ("it holds no sequences" if source.split == WHOLE else
                    f"data.split={source.split!r} of its {count} sequences")
            out.append(f"{source.field}={source.path}: its validation split is empty ({held}); "
                       "validation "
                       "(train.eval_interval > 0) reads it: give more data, a larger middle "
                       "part of data.split, or a data.validation dataset")
    return out


def describe(cfg: RunConfig) -> str:
    """For the start alert and the log: whether validation is on, and what it reads."""
    sources = eval_sources(cfg)
    if not sources:
        return "off"
    t = cfg.train
    return (f"every {t.eval_interval} steps and after the last: {t.eval_iters} batches of "
            f"{t.global_batch_size} from each of {', '.join(s.name for s in sources)}")

"""Fine-tuning counted in epochs: ``train.epochs`` sets ``train.steps`` from the prepared chat
data's own count of training sequences (``<prefix>.stats.json``, written by ``python -m
tools.prepare_data --format chat``), on the login node, before anything is checked or queued."""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Collection
from pathlib import Path

from launch.schema import RunConfig


def steps_for_epochs(epochs: float, sequences: int, split: str, global_batch_size: int) -> int:
    """Global batches for ``epochs`` passes over the training part (``data.split``'s first
    share, megatron's rule) of ``sequences`` training sequences; at least one."""
    parts = [float(p) for p in split.split(",")]
    train_sequences = sequences * parts[0] / sum(parts)
    return max(1, math.ceil(epochs * train_sequences / global_batch_size))


def _sequences(cfg: RunConfig, index: int, path: Path) -> tuple[int, str]:
    """Training sequences one source makes at this ``train.seq_length``, or why unknown."""
    field = f"train.epochs={cfg.train.epochs}: data.sources[{index}]"
    try:
        report = json.loads(path.read_text())
        total = report["total"]
    except (OSError, ValueError, KeyError):
        return 0, (f"{field} has no readable {path} (python -m tools.prepare_data --format chat "
                   "writes it); prepare the data again, or set train.steps and train.epochs=0")
    wanted = cfg.train.seq_length + 1
    if report.get("max_tokens") != wanted:
        return 0, (f"{field}: {path} counts sequences of {report.get('max_tokens')} tokens, "
                   f"train.seq_length={cfg.train.seq_length} reads {wanted}; prepare with "
                   f"--max-tokens {wanted}, or set train.steps and train.epochs=0")
    return int(total["packed_sequences"] if cfg.data.packing else total["kept"]), ""


def with_epochs(cfg: RunConfig, explicit: Collection[str] = frozenset()
                ) -> tuple[RunConfig, list[str]]:
    """``cfg`` with ``train.steps`` for ``train.epochs`` (unchanged when it is 0), or the
    problems: epochs outside fine-tuning, both counts given, data that does not say its size."""
    train = cfg.train
    if not train.epochs:
        return cfg, []
    if cfg.data.kind != "sft":
        return cfg, [f"train.epochs={train.epochs} counts passes over fine-tuning data "
                     f"(data.kind=sft), not data.kind={cfg.data.kind}; set train.steps (or "
                     "train.epochs=0)"]
    if "train.steps" in explicit:
        return cfg, [f"train.steps and train.epochs={train.epochs} both set; keep one "
                     "(train.epochs=0 to count steps)"]
    counted = [_sequences(cfg, i, Path(f"{s.path}.stats.json"))
               for i, s in enumerate(cfg.data.sources)]
    problems = [why for _, why in counted if why]
    if problems:
        return cfg, problems
    steps = steps_for_epochs(train.epochs, sum(n for n, _ in counted), cfg.data.split,
                             train.global_batch_size)
    return dataclasses.replace(cfg, train=dataclasses.replace(train, steps=steps)), []

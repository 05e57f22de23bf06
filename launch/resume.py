"""A relaunch over an existing ``checkpoint.dir``: what changed since the checkpoint it resumes.

Checked on the login node, before anything is queued. A checkpoint of another architecture
cannot load (the ranks would fail inside megatron with "Global shape mismatch"), so it is
refused in one line naming each field that differs. A changed lr schedule needs an explicit
``train.lr_schedule_on_resume`` (megatron's scheduler would otherwise keep or refuse it
silently inside the ranks). Every other changed hyperparameter is printed and recorded in the
run folder (``RESUME_CHANGES``). The rules are pure functions of two config trees; only
``saved_config`` reads the disk.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from launch import ckpt_commit
from launch.config import to_yaml
from launch.schema import RUN_CONFIG, RunConfig

ARCHITECTURE = ("model.num_layers", "model.hidden_size", "model.num_attention_heads",
                "model.num_query_groups", "model.ffn_hidden_size", "model.vocab_size",
                "model.untie_embeddings_and_output_weights")
"""Fields that set the shapes of the saved tensors (or which tensors exist)."""
SCHEDULE = ("train.lr", "train.min_lr", "train.warmup_steps", "train.steps",
            "train.lr_decay_style", "optimizer.weight_decay")
"""What megatron's ``OptimizerParamScheduler`` saves and checks on load (max/min lr, warmup,
decay steps and style, weight decay; its wd increment runs over ``train.steps``)."""
COMPARED = ("model", "parallel", "train", "optimizer", "data")
"""Sections whose changes are reported; cluster, logging and launch change freely."""
RESUME_CHANGES = "resume-changes.txt"
"""File in ``run_dir``: the changes against the resumed checkpoint's config, as printed."""


@dataclass(frozen=True)
class Change:
    key: str
    saved: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.saved!r} -> {self.new!r}"


def newest_committed(checkpoint_dir: Path) -> Optional[Path]:
    """The newest committed ``step_<N>`` folder holding its config, or None."""
    found = [(step, p) for p in checkpoint_dir.glob("step_*")
             if (step := ckpt_commit.parse_step(p.name)) is not None
             and (p / ckpt_commit.MARKER).is_file() and (p / RUN_CONFIG).is_file()]
    return max(found)[1] if found else None


def saved_config(checkpoint_dir: Path) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest committed checkpoint of ``checkpoint_dir`` and its config tree."""
    folder = newest_committed(checkpoint_dir)
    if folder is None:
        return None
    return folder, yaml.safe_load((folder / RUN_CONFIG).read_text()) or {}


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Fields of the ``COMPARED`` sections whose value differs; a field only one side has (a
    schema that grew since the save) is not a change."""
    old, cur = _flat(saved), _flat(new)
    return [Change(key, old[key], cur[key]) for key in sorted(old.keys() & cur.keys())
            if key.split(".")[0] in COMPARED and old[key] != cur[key]]


def architecture_problem(found: list[Change], folder: Path, cfg: RunConfig) -> list[str]:
    """One line naming every architecture field that differs, and how to start fresh."""
    differ = [c for c in found if c.key in ARCHITECTURE]
    if not differ:
        return []
    fields = "; ".join(f"{c.key}={c.new} here, {c.saved} there" for c in differ)
    return [f"checkpoint.dir={cfg.checkpoint.dir} holds {folder.name} of another architecture "
            f"({fields}): it cannot be resumed; use the checkpoint's values, or start fresh "
            f"with a new name (name={cfg.name}-2) or checkpoint.dir"]


def schedule_problem(found: list[Change], folder: Path, rule: str) -> list[str]:
    """``train.lr_schedule_on_resume=error`` and the schedule changed: say how to choose."""
    differ = [c for c in found if c.key in SCHEDULE]
    if rule != "error" or not differ:
        return []
    return [f"{', '.join(map(str, differ))} changes the lr schedule saved in {folder}: set "
            "train.lr_schedule_on_resume=checkpoint to keep the saved schedule, or "
            "train.lr_schedule_on_resume=config to follow this config's from the saved step"]


def describe(found: list[Change], folder: Path, rule: str) -> str:
    """What the launcher prints and records: every change, and whose schedule applies."""
    lines = [f"resuming {folder}; changed since its config:"] + [f"  {c}" for c in found]
    if any(c.key in SCHEDULE for c in found):
        whose = "the checkpoint's" if rule == "checkpoint" else "this config's"
        lines.append(f"  lr schedule: {whose} (train.lr_schedule_on_resume={rule})")
    return "\n".join(lines)


def check(cfg: RunConfig) -> tuple[list[str], str]:
    """Problems refusing the relaunch, and the description of its changes ('' when there is
    no checkpoint to resume or nothing changed)."""
    saved = saved_config(Path(cfg.checkpoint.dir))
    if saved is None:
        return [], ""
    folder, tree = saved
    found = changes(tree, yaml.safe_load(to_yaml(cfg)))
    problems = architecture_problem(found, folder, cfg)
    problems += schedule_problem(found, folder, cfg.train.lr_schedule_on_resume)
    return problems, describe(found, folder, cfg.train.lr_schedule_on_resume) if found else ""

"""A spawned rank that loads a training checkpoint with megatron's own loader and saves logits.

The reference an export is checked against: megatron-core's ``dist_checkpointing`` reshards
the checkpoint into this layout, independently of ``tools.convert_hf``'s reader. Kept apart
from the tests so spawned ranks do not import ``transformers`` (seconds each).
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from tests.unit.megatron_forward import cpu_rank


def checkpoint_logits(rank: int, world: int, port: int, step_dir: str, tokens: torch.Tensor,
                      out: str) -> None:
    """One rank of a TP=world model built by the trainer's own code from ``step_dir``."""
    from megatron.core import dist_checkpointing

    from launch.schema import ModelConfig, TrainConfig
    from megatron_ext.model import build_model

    saved = yaml.safe_load((Path(step_dir) / "config.yaml").read_text())
    model_cfg = ModelConfig(**saved["model"])
    with cpu_rank(rank, world, port) as layout:
        chunks, _ = build_model(model_cfg, TrainConfig(precision="fp32"), layout, False)
        model = chunks[0].eval()
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, step_dir)
        model.load_state_dict(state["model"])
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        with torch.no_grad():
            torch.save(model(tokens, positions, None), f"{out}.{rank}")

"""A spawned rank that loads a training checkpoint with megatron's own loader and saves logits.

The reference an export is checked against: megatron-core's ``dist_checkpointing`` reshards
the checkpoint into this layout, independently of ``tools.convert_hf``'s reader. Kept apart
from the tests so spawned ranks do not import ``transformers`` (seconds each).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml


def checkpoint_logits(rank: int, world: int, port: int, step_dir: str, tokens: torch.Tensor,
                      out: str) -> None:
    """One rank of a TP=world model built by the trainer's own code from ``step_dir``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from megatron.core import dist_checkpointing

    from launch.schema import Layout, ModelConfig, TrainConfig
    from megatron_ext import parallel
    from megatron_ext.cpu import cpu_mode
    from megatron_ext.env import RunEnv
    from megatron_ext.model import build_model

    saved = yaml.safe_load((Path(step_dir) / "config.yaml").read_text())
    model_cfg = ModelConfig(**saved["model"])
    layout = Layout(tp=world, pp=1, cp=1, dp=1)
    with cpu_mode():
        parallel.init(layout, RunEnv.from_env(), seed=1, timeout_s=120, use_gpu=False)
        try:
            chunks, _ = build_model(model_cfg, TrainConfig(precision="fp32"), layout, False)
            model = chunks[0].eval()
            state = dist_checkpointing.load({"model": model.sharded_state_dict()}, step_dir)
            model.load_state_dict(state["model"])
            positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
            with torch.no_grad():
                torch.save(model(tokens, positions, None), f"{out}.{rank}")
        finally:
            parallel.shutdown()

"""A spawned rank that builds the trainer's GPTModel from pretrained weights and saves logits.

Kept apart from the tests so spawned ranks do not import ``transformers`` (seconds each).
"""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

import torch

from megatron_ext.weights import open_weights


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cpu_rank(rank: int, world: int, port: int, threads: int = 1, cp: int = 1) -> Iterator[Any]:
    """This process as rank ``rank`` of a TP=``world/cp`` x CP=``cp`` job on CPU over gloo
    (``cpu_mode`` on); yields the layout. megatron is imported here, in the spawned rank, not by
    the tests."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from launch.schema import Layout
    from megatron_ext import parallel
    from megatron_ext.cpu import cpu_mode
    from megatron_ext.env import RunEnv

    layout = Layout(tp=world // cp, pp=1, cp=cp, dp=1)
    with cpu_mode():
        parallel.init(layout, RunEnv.from_env(), seed=1, timeout_s=120, use_gpu=False)
        try:
            yield layout
        finally:
            parallel.shutdown()


def megatron_logits(rank: int, world: int, port: int, weights: str, tokens: torch.Tensor,
                    out: str) -> None:
    """One rank of a TP=world model built by the trainer's own code, loaded from ``weights``."""
    from launch.schema import ModelConfig, TrainConfig
    from megatron_ext.init_from import load_pretrained
    from megatron_ext.model import build_model

    model_cfg = ModelConfig(**open_weights(weights).model, transformer_impl="local")
    with cpu_rank(rank, world, port) as layout:
        chunks, _ = build_model(model_cfg, TrainConfig(precision="fp32"), layout, False)
        load_pretrained(chunks, weights, model_cfg)
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        with torch.no_grad():
            logits = chunks[0].eval()(tokens, positions, None)
        torch.save(logits, f"{out}.{rank}")

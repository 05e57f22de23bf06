"""Rank entry for fault-injection tests: the real ``megatron_ext.train`` with one fault.

``python tests/integration/faulty_rank.py <config.yaml> nan <micro-batches per step> <step>[,<step>]``
    rank 0's loss is NaN in those steps (a bad batch or an overflow would do the same, only
    less predictably);
``python tests/integration/faulty_rank.py <config.yaml> nan_grad <micro-batches per step> <step>[,<step>]``
    rank 0's gradients are NaN in those steps while every loss stays finite (an overflow in
    backward only);
``python tests/integration/faulty_rank.py <config.yaml> spike <micro-batches per step> <step>[,<step>]``
    rank 0's loss (and so its gradients) is 50 times larger in those steps (a bad batch);
``python tests/integration/faulty_rank.py <config.yaml> load_error <rank>``
    that rank's first checkpoint load raises an I/O error before megatron's load starts (its
    peers go on into the load's collectives);
``python tests/integration/faulty_rank.py <config.yaml> slow_save <seconds>``
    every checkpoint save blocks ``seconds`` longer (a slow file system, a sync save);
``python tests/integration/faulty_rank.py <config.yaml> slow <rank> <seconds>``
    that rank's every forward pass takes ``seconds`` longer (a throttled GPU, a slow host).
"""
from __future__ import annotations

import itertools
import os
import sys
import time

import torch
from megatron.core import dist_checkpointing

from megatron_ext import step as step_module
from megatron_ext import train
from megatron_ext.checkpoint import Checkpointer


class _NanBackward(torch.autograd.Function):
    """The identity forward; NaN gradients backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison(per_step: int, steps: str, *, gradient_only: bool, factor: float = float("nan")
           ) -> None:
    poisoned_steps = {int(s) for s in steps.split(",")}
    calls = itertools.count()
    real_loss = step_module._loss

    def loss(loss_mask, per_token_loss):  # called once per micro-batch, in step order
        step = next(calls) // per_step + 1
        if os.environ["RANK"] == "0" and step in poisoned_steps:
            per_token_loss = _NanBackward.apply(per_token_loss) if gradient_only \
                else per_token_loss * factor
        return real_loss(loss_mask, per_token_loss)

    step_module._loss = loss


def fail_first_load(rank: int) -> None:
    real_load = dist_checkpointing.load
    calls = itertools.count()

    def load(*args, **kwargs):
        if int(os.environ["RANK"]) == rank and next(calls) == 0:
            raise OSError(5, "Input/output error (injected)")
        return real_load(*args, **kwargs)

    dist_checkpointing.load = load


def slow_save(seconds: float) -> None:
    real_save = Checkpointer.save

    def save(self, *args, **kwargs):
        time.sleep(seconds)
        return real_save(self, *args, **kwargs)

    Checkpointer.save = save


def slow_forward(rank: int, seconds: float) -> None:
    real_forward = step_module.forward_step

    def forward(data_iterator, model):
        if int(os.environ["RANK"]) == rank:
            time.sleep(seconds)
        return real_forward(data_iterator, model)

    step_module.forward_step = forward


def main() -> int:
    config, fault, *args = sys.argv[1:]
    if fault in ("nan", "nan_grad"):
        poison(int(args[0]), args[1], gradient_only=fault == "nan_grad")
    elif fault == "spike":
        poison(int(args[0]), args[1], gradient_only=False, factor=50.0)
    elif fault == "slow_save":
        slow_save(float(args[0]))
    elif fault == "load_error":
        fail_first_load(int(args[0]))
    else:
        slow_forward(int(args[0]), float(args[1]))
    return train.main([config])


if __name__ == "__main__":
    sys.exit(main())

"""Rank entry for fault-injection tests: the real ``megatron_ext.train`` with one fault.

``python tests/integration/faulty_rank.py <config.yaml> nan <micro-batches per step> <step>[,<step>]``
    rank 0's loss is NaN in those steps (a bad batch or an overflow would do the same, only
    less predictably);
``python tests/integration/faulty_rank.py <config.yaml> slow <rank> <seconds>``
    that rank's every forward pass takes ``seconds`` longer (a throttled GPU, a slow host).
"""
from __future__ import annotations

import itertools
import os
import sys
import time

from megatron_ext import step as step_module
from megatron_ext import train


def poison_loss(per_step: int, steps: str) -> None:
    poisoned_steps = {int(s) for s in steps.split(",")}
    calls = itertools.count()
    real_loss = step_module._loss

    def loss(loss_mask, per_token_loss):  # called once per micro-batch, in step order
        step = next(calls) // per_step + 1
        if os.environ["RANK"] == "0" and step in poisoned_steps:
            per_token_loss = per_token_loss * float("nan")
        return real_loss(loss_mask, per_token_loss)

    step_module._loss = loss


def slow_forward(rank: int, seconds: float) -> None:
    real_forward = step_module._forward_step

    def forward(data_iterator, model):
        if int(os.environ["RANK"]) == rank:
            time.sleep(seconds)
        return real_forward(data_iterator, model)

    step_module._forward_step = forward


def main() -> int:
    config, fault, *args = sys.argv[1:]
    if fault == "nan":
        poison_loss(int(args[0]), args[1])
    else:
        slow_forward(int(args[0]), float(args[1]))
    return train.main([config])


if __name__ == "__main__":
    sys.exit(main())

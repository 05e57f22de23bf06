"""Rank entry for the NaN test: the real ``megatron_ext.train``, with rank 0's loss made NaN
in the given steps (a bad batch or an overflow would do the same, only less predictably).

``python tests/integration/nan_rank.py <config.yaml> <micro-batches per step> <step>[,<step>]``
"""
from __future__ import annotations

import itertools
import os
import sys

from megatron_ext import step as step_module
from megatron_ext import train


def main() -> int:
    config, per_step, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    poisoned_steps = {int(s) for s in steps.split(",")}
    calls = itertools.count()
    real_loss = step_module._loss

    def loss(loss_mask, per_token_loss):  # called once per micro-batch, in step order
        step = next(calls) // per_step + 1
        if os.environ["RANK"] == "0" and step in poisoned_steps:
            per_token_loss = per_token_loss * float("nan")
        return real_loss(loss_mask, per_token_loss)

    step_module._loss = loss
    return train.main([config])


if __name__ == "__main__":
    sys.exit(main())

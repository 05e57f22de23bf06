"""The communication-overlap options: refused with the reason when they cannot work, and passed
to megatron's own DDP and optimizer configs when they can."""
from __future__ import annotations

import pytest

from launch.config import derive_layout, validate
from megatron_ext.model import transformer_config
from megatron_ext.optim import ddp_config, optimizer_config
from tests.conftest import make_config

@pytest.mark.parametrize("overrides,fragment", [
    (["parallel.overlap_param_gather=true"],
     "parallel.overlap_param_gather=true needs parallel.overlap_grad_reduce=true"),
    (["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
      "optimizer.distributed=false"],
     "parallel.overlap_param_gather=true needs optimizer.distributed=true"),
])
def test_overlap_rules_name_the_field_and_the_reason(overrides: list[str], fragment: str) -> None:
    assert any(fragment in p for p in validate(make_config(*overrides)))


def test_a_full_overlap_layout_is_valid() -> None:
    cfg = make_config("parallel=tp2_overlap", "parallel.overlap_param_gather=true",
                      "cluster=pcs_p5", "cluster.nodes=1")
    assert validate(cfg) == []


@pytest.mark.parametrize("grad,param", [(False, False), (True, False), (True, True)])
def test_overlap_options_reach_megatrons_configs(grad: bool, param: bool) -> None:
    cfg = make_config(f"parallel.overlap_grad_reduce={grad}",
                      f"parallel.overlap_param_gather={param}")
    ddp = ddp_config(cfg)
    assert (ddp.overlap_grad_reduce, ddp.overlap_param_gather) == (grad, param)
    assert ddp.use_distributed_optimizer and ddp.grad_reduce_in_fp32
    config = transformer_config(cfg.model, cfg.train, derive_layout(cfg), use_gpu=False)
    optimizer = optimizer_config(config, cfg)
    assert optimizer.overlap_param_gather == param
    assert optimizer.use_distributed_optimizer and optimizer.lr == cfg.train.lr

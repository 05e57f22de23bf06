"""megatron-core is the oracle: validate refuses a model x layout exactly when megatron does.

For 400 generated configurations, the ranks' own ``transformer_config`` builds
megatron's ``TransformerConfig`` (its ``ModelParallelConfig`` checks included), megatron's
``get_num_layers_to_build`` splits the layers over the pipeline stages and model chunks, and
one transformer layer of the local spec, which CPU ranks build, is constructed: its attention,
MLP and norms run every divisibility check megatron makes when it splits a layer over TP ranks.
The layer needs
only the size of its TP group, so a stand-in group of that size replaces the TP ranks (hundreds
of real multi-process groups would take minutes); everything else is megatron's own code.
"""
from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
import torch
import torch.distributed as dist
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer

from launch.config import validate
from launch.schema import Layout, RunConfig
from megatron_ext.model import transformer_config
from tests.conftest import make_config
from tests.unit.megatron_forward import free_port


class SizedGroup:
    """What megatron's layer constructors ask of a process group: its size and this rank."""

    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return 0


Case = tuple[int, int, int, int, int, int, int, int, bool]
"""(heads, KV groups, head width, MLP width, layers, TP, PP, VPP, SP)."""


def _generated() -> list[Case]:
    """A seeded sample of every combination (VPP > 1 only with PP > 1: a schema rule)."""
    heads_groups = [(h, g) for h in (4, 6, 8, 12) for g in range(1, h + 1) if h % g == 0]
    pipelines = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2)]
    every = [(h, g, d, f, layers, tp, pp, vpp, sp)
             for (h, g), d, f, layers, tp, (pp, vpp), sp in itertools.product(
                 heads_groups, (3, 8), (48, 96, 50), (4, 6), (1, 2, 3, 4, 6, 8), pipelines,
                 (False, True))]
    return random.Random(24).sample(every, 400)


def _config(base: RunConfig, case: Case) -> RunConfig:
    heads, groups, width, ffn, layers, tp, pp, vpp, sp = case
    model = dataclasses.replace(base.model, num_attention_heads=heads, num_query_groups=groups,
                                hidden_size=heads * width, ffn_hidden_size=ffn, num_layers=layers)
    parallel = dataclasses.replace(base.parallel, tp=tp, pp=pp, vpp=vpp, sp=sp, dp=1)
    cluster = dataclasses.replace(base.cluster, gpus_per_node=tp * pp)
    return dataclasses.replace(base, model=model, parallel=parallel, cluster=cluster)


def _megatron_refuses(cfg: RunConfig) -> bool:
    p = cfg.parallel
    layout = Layout(tp=p.tp, pp=p.pp, cp=1, dp=1, vpp=p.vpp, sp=p.sp)
    groups = ProcessGroupCollection(tp=SizedGroup(layout.tp), cp=SizedGroup(1),
                                    pp=SizedGroup(layout.pp))
    try:
        config = transformer_config(cfg.model, cfg.train, layout, use_gpu=False)
        vp_stage = 0 if layout.vpp > 1 else None  # the first model chunk of the first stage
        get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=0)
        TransformerLayer(config, get_gpt_layer_local_spec(normalization="RMSNorm").submodules,
                         layer_number=1, pg_collection=groups, vp_stage=vp_stage)
    except (AssertionError, ValueError):  # megatron's divide() asserts, its configs raise
        return True
    return False


@pytest.fixture(scope="module")
def one_process_group():
    """megatron reads group sizes only once torch.distributed is up: a world of one here."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_validate_refuses_exactly_what_megatron_refuses(one_process_group, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # local ranks on CPU: the local spec
    base = make_config("train.seq_length=144", "train.global_batch_size=16",
                       "train.micro_batch_size=4")
    torch.manual_seed(0)
    refused, disagree = 0, []
    for case in _generated():
        cfg = _config(base, case)
        megatron_refuses = _megatron_refuses(cfg)
        refused += megatron_refuses
        if bool(validate(cfg)) != megatron_refuses:
            disagree.append((case, validate(cfg)))
    assert disagree == []
    assert min(refused, 400 - refused) >= 50  # both outcomes well represented (337 refused)

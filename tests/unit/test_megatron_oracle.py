"""megatron-core is the oracle: validate refuses a model x layout exactly when megatron does.

For a few hundred generated configurations, the ranks' own ``transformer_config`` builds
megatron's ``TransformerConfig`` (its ``ModelParallelConfig`` checks included) and then one
transformer layer of the local spec, which CPU ranks build: its attention, MLP and norms run
every divisibility check megatron makes when it splits a layer over TP ranks. The layer needs
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


def _generated() -> list[tuple[int, int, int, int, int, bool]]:
    """(heads, KV groups, head width, MLP width, TP, SP): a seeded sample of every combination."""
    heads_groups = [(h, g) for h in (4, 6, 8, 12) for g in range(1, h + 1) if h % g == 0]
    every = [(h, g, d, f, tp, sp) for (h, g), d, f, tp, sp in itertools.product(
        heads_groups, (3, 8), (48, 50, 51), (1, 2, 3, 4, 6, 8), (False, True))]
    return random.Random(24).sample(every, 300)


def _config(base: RunConfig, heads: int, groups: int, width: int, ffn: int, tp: int,
            sp: bool) -> RunConfig:
    model = dataclasses.replace(base.model, num_attention_heads=heads, num_query_groups=groups,
                                hidden_size=heads * width, ffn_hidden_size=ffn)
    parallel = dataclasses.replace(base.parallel, tp=tp, sp=sp, dp=1)
    cluster = dataclasses.replace(base.cluster, gpus_per_node=tp)
    return dataclasses.replace(base, model=model, parallel=parallel, cluster=cluster)


def _megatron_refuses(cfg: RunConfig) -> bool:
    layout = Layout(tp=cfg.parallel.tp, pp=1, cp=1, dp=1, sp=cfg.parallel.sp)
    groups = ProcessGroupCollection(tp=SizedGroup(layout.tp), cp=SizedGroup(1),
                                    pp=SizedGroup(1))
    try:
        config = transformer_config(cfg.model, cfg.train, layout, use_gpu=False)
        TransformerLayer(config, get_gpt_layer_local_spec(normalization="RMSNorm").submodules,
                         layer_number=1, pg_collection=groups)
    except (AssertionError, ValueError) as err:
        return bool(str(err))
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
    disagree = []
    torch.manual_seed(0)
    for case in _generated():
        cfg = _config(base, *case)
        if bool(validate(cfg)) != _megatron_refuses(cfg):
            disagree.append((case, validate(cfg)))
    assert disagree == []

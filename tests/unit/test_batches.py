"""The global batch is the same samples whatever the layout: the basis of exact comparisons."""
from __future__ import annotations

import numpy
import pytest

from launch.schema import ModelConfig
from megatron_ext.data import BatchPlan, sample_digest
from launch.planning.flops import padded_vocab_size


def _global_batch(gbs: int, mbs: int, dp: int, consumed: int) -> list[int]:
    indices = []
    for rank in range(dp):
        plan = BatchPlan(gbs, mbs, dp, rank)
        for mb in range(plan.num_microbatches):
            indices += plan.sample_indices(consumed, mb)
    return sorted(indices)


@pytest.mark.parametrize("mbs,dp", [(1, 1), (4, 1), (2, 2), (4, 2), (1, 8)])
def test_every_layout_reads_the_same_contiguous_global_batch(mbs: int, dp: int) -> None:
    assert _global_batch(16, mbs, dp, consumed=32) == list(range(32, 48))


def test_ranks_never_share_a_sample() -> None:
    plans = [BatchPlan(16, 2, 4, r) for r in range(4)]
    seen = [i for p in plans for mb in range(p.num_microbatches) for i in p.sample_indices(0, mb)]
    assert len(seen) == len(set(seen)) == 16


def test_resume_continues_where_the_run_stopped() -> None:
    plan = BatchPlan(8, 2, 2, 1)
    assert plan.sample_indices(consumed_samples=80, microbatch=0) == [82, 83]


@pytest.mark.parametrize("vocab,tp,expected", [(512, 1, 512), (512, 2, 512), (500, 1, 512),
                                               (128256, 8, 129024), (128256, 1, 128256)])
def test_vocab_padding_follows_megatron(vocab: int, tp: int, expected: int) -> None:
    assert padded_vocab_size(ModelConfig(vocab_size=vocab), tp) == expected


def test_a_sample_digest_tells_its_place_and_its_tokens_apart_not_their_dtype() -> None:
    tokens = numpy.arange(16)
    digest = sample_digest(5, tokens)
    assert digest != sample_digest(6, tokens)  # a sample read one place late
    assert digest != sample_digest(5, tokens[::-1])  # another sample in its place
    assert digest == sample_digest(5, tokens.astype(numpy.uint16))  # megatron stores uint16/int32

"""Fine-tuning's loss: over the answer tokens only, equal to an independent cross-entropy, and
the same whether conversations are packed several to a sequence or one each."""
from __future__ import annotations

import math
from pathlib import Path

import numpy
import pytest
import torch

from launch.tokenizer import load_tokenizer
from megatron_ext.sft_data import pack, sample, split_range
from tests.unit.megatron_forward import free_port
from tests.unit.megatron_sft import sft_losses
from tools import demo_chat


def test_pack_is_next_fit_in_order() -> None:
    assert pack([3, 4, 2, 5, 1], capacity=7, packing=True) == [[0, 1], [2, 3], [4]]
    assert pack([3, 4], capacity=7, packing=False) == [[0], [1]]


def test_packed_sample_blocks_attention_positions_and_labels_at_the_boundary() -> None:
    a = (numpy.array([10, 11, 12]), numpy.array([0, 1, 1], numpy.uint8))
    b = (numpy.array([20, 21]), numpy.array([1, 1], numpy.uint8))
    s = sample([a, b], seq_length=6, pad_id=0, packing=True)
    assert list(s["tokens"]) == [10, 11, 12, 20, 21, 0]
    assert list(s["labels"]) == [11, 12, 20, 21, 0, 0]
    # 12 -> 20 crosses into b: not in the loss although b's first token is an answer token
    assert list(s["loss_mask"]) == [1, 1, 0, 1, 0, 0]
    assert list(s["position_ids"]) == [0, 1, 2, 0, 1, 5]
    allowed = ~s["attention_mask"][0]
    assert allowed[4].tolist() == [False, False, False, True, True, False]
    assert allowed[2].tolist() == [True, True, True, False, False, False]
    assert "attention_mask" not in sample([a], seq_length=6, pad_id=0, packing=False)


def test_split_range_is_contiguous_by_weight() -> None:
    assert [split_range(10, "8,1,1", p) for p in range(3)] == [range(0, 8), range(8, 9),
                                                               range(9, 10)]


def conversations() -> list[dict]:
    """Turn counts and lengths that differ, a system prompt, so packing mixes shapes."""
    out = demo_chat.conversations()
    out[1]["messages"].insert(0, {"role": "system", "content": "Answer in one sentence."})
    out[2]["messages"] += [{"role": "user", "content": "Are you sure?"},
                           {"role": "assistant", "content": "Yes, it is blue."}]
    return out


@pytest.mark.slow
def test_loss_is_plain_cross_entropy_on_answers_packed_or_not(tmp_path: Path) -> None:
    prefix = demo_chat.make(tmp_path, conversations())
    eod = load_tokenizer(tmp_path / "tokenizer")[1]
    out = tmp_path / "losses.pt"
    torch.multiprocessing.spawn(sft_losses, nprocs=1,
                                args=(free_port(), str(prefix), 64, eod, str(out)))
    r = torch.load(out)
    ref_sum, ref_tokens = r["reference"]
    assert ref_tokens > 0 and r["sequences_packed"] < r["sequences_unpacked"] == 8
    for key in ("unpacked", "packed"):
        loss_sum, tokens = r[key]
        assert tokens == ref_tokens, key
        assert math.isclose(loss_sum / tokens, ref_sum / ref_tokens, rel_tol=1e-5), key
    # the mask is what keeps conversations apart: without it the sum moves past the tolerance
    leaky_sum, _ = r["packed_no_mask"]
    assert not math.isclose(leaky_sum, ref_sum, rel_tol=1e-5)
    assert abs(leaky_sum - ref_sum) > 20 * abs(r["packed"][0] - ref_sum)

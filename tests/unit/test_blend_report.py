"""tools.blend_report: planned tokens split by normalised weight, epochs of each training split."""
from __future__ import annotations

import pytest

from tests.conftest import make_config
from tools.blend_report import blend, format_table, planned_tokens


def test_blend_example_composes_and_normalises_weights() -> None:
    cfg = make_config("data=blend_example", "train.steps=100", "train.global_batch_size=8",
                      "train.seq_length=128")
    assert planned_tokens(cfg) == 100 * 8 * 128
    shares = blend(cfg, [10_000_000, None, 50_000, 1_000])
    assert sum(s.weight for s in shares) == pytest.approx(1.0)
    assert shares[0].weight == pytest.approx(0.67 / 0.99)
    assert shares[0].available_tokens == 9_900_000  # split "99,1,0": the training part
    assert shares[1].epochs is None
    assert shares[3].epochs == pytest.approx(shares[3].planned_tokens / 990)
    assert "missing" in format_table(shares, planned_tokens(cfg))

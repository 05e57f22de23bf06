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


def test_planned_tokens_split_by_each_source_s_languages(tmp_path) -> None:
    import json

    from tools.blend_report import format_languages, planned_by_language, source_languages

    cfg = make_config("data=blend_example", "train.steps=100", "train.global_batch_size=8",
                      "train.seq_length=128")
    shares = blend(cfg, [1000, 1000, 1000, 1000])
    stats = tmp_path / "web.stats.json"  # as tools.prepare_data --langid writes it
    stats.write_text(json.dumps({"languages": {"de": {"tokens": 750}, "en": {"tokens": 250}}}))
    web = source_languages(str(tmp_path / "web"))
    assert web == {"de": 750, "en": 250} and source_languages(str(tmp_path / "none")) is None
    by_language = planned_by_language(shares, [web, {"en": 10}, None, None])
    assert by_language["de"] == round(shares[0].planned_tokens * 0.75)
    assert by_language["en"] == round(shares[0].planned_tokens * 0.25 + shares[1].planned_tokens)
    assert by_language["unknown"] == shares[2].planned_tokens + shares[3].planned_tokens
    assert sum(by_language.values()) == pytest.approx(planned_tokens(cfg), abs=2)
    assert "de" in format_languages(by_language).splitlines()[1]

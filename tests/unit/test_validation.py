"""Validation's login-node rules and its pure parts: which data each pass reads, what is
refused before anything is queued, when a rising loss alerts, how the progress line reads."""
from __future__ import annotations

from pathlib import Path

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from launch.config import validate
from launch.eval_schema import eval_sources, validation_sequences
from launch.prepare import data_problems
from megatron_ext.metrics import format_validation
from megatron_ext.validation import RiseTracker
from tests.conftest import make_config
from tests.unit.test_preflight import _refused


def _dataset(prefix: Path, documents: int) -> str:
    """A real megatron indexed dataset of ``documents`` short documents."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16)
    for i in range(documents):
        builder.add_document(numpy.arange(i, i + 50, dtype=numpy.uint16), [50])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_each_source_and_each_validation_dataset_is_one_named_loss() -> None:
    cfg = make_config("data.sources=[{path: /d/web/web_text_document, weight: 2}, "
                      "{path: /d/code/code_text_document, weight: 1}]",
                      "data.validation=[{path: /d/held/web_text_document}]")
    assert [(s.name, s.field, s.split) for s in eval_sources(cfg)] == [
        ("web_text_document", "data.sources[0].path", "98,1,1"),
        ("code_text_document", "data.sources[1].path", "98,1,1"),
        ("web_text_document_2", "data.validation[0].path", "0,1,0")]
    assert eval_sources(make_config("train.eval_interval=0", "train.eval_iters=0")) == []
    assert [s.name for s in eval_sources(make_config("data=synthetic"))] == ["synthetic"]


def test_megatron_splits_validation_by_rounded_bookends() -> None:
    assert validation_sequences("98,1,1", 760) == 7  # rows round(744.8)=745 to round(752.4)=752
    assert validation_sequences("98,1,1", 20) == 0
    assert validation_sequences("0,1,0", 5) == 5


def test_bad_validation_settings_name_the_field() -> None:
    assert ("train.eval_iters=3 needs train.eval_interval > 0 (steps between validations; 0 "
            "turns validation off)") in validate(make_config("train.eval_interval=0",
                                                             "train.eval_iters=3"))
    assert any(p.startswith("train.eval_interval=10 needs train.eval_iters > 0")
               for p in validate(make_config("train.eval_interval=10", "train.eval_iters=0")))
    assert any(p.startswith("train.eval_interval=100 needs validation data: data.split='99,0,1'")
               for p in validate(make_config("data.split='99,0,1'")))
    assert validate(make_config("data.split='99,0,1'", "data.validation=[{path: /x}]")) == []
    assert "train.eval_iters=-1 must be >= 0" in validate(make_config("train.eval_iters=-1"))
    assert any(p.startswith("resilience.spikes.val_rises=-2 must be >= 0")
               for p in validate(make_config("resilience.spikes.val_rises=-2")))


def test_an_empty_or_missing_validation_split_is_refused(tmp_path: Path) -> None:
    small = _dataset(tmp_path / "small" / "small_text_document", 20)
    big = _dataset(tmp_path / "big" / "big_text_document", 300)
    cfg = make_config(f"data.sources=[{{path: {small}, weight: 1}}, {{path: {big}, weight: 1}}]",
                      f"data.validation=[{{path: {tmp_path}/nowhere}}]", "data.prepare_demo=false")
    problems = data_problems(cfg)
    assert problems[0].startswith(
        f"data.sources[0].path={small}: its validation split is empty (data.split='98,1,1' of "
        "its 20 sequences)")
    assert problems[1].startswith(f"data.validation[0].path={tmp_path}/nowhere: {tmp_path}/"
                                  "nowhere.bin does not exist")
    assert len(problems) == 2  # the big source's 3 validation sequences are fine
    assert data_problems(make_config(
        f"data.sources=[{{path: {small}, weight: 1}}]", "train.eval_interval=0",
        "train.eval_iters=0")) == []  # validation off: nothing to read


@pytest.mark.slow
def test_the_launcher_refuses_a_missing_validation_dataset_in_one_line(tmp_path: Path) -> None:
    big = _dataset(tmp_path / "big" / "big_text_document", 300)
    errors = _refused(tmp_path, "data.tokenizer=t.json", "data.prepare_demo=false",
                      f"data.sources=[{{path: {big}, weight: 1}}]",
                      "data.validation=[{path: held/out_text_document}]")
    assert errors == [
        f"error: data.validation[0].path={tmp_path}/held/out_text_document: {tmp_path}/held/"
        "out_text_document.bin does not exist (a megatron indexed dataset is <prefix>.bin and "
        "<prefix>.idx; build it with python -m tools.prepare_data)"]


def test_a_loss_rising_k_evaluations_in_a_row_alerts_each_time_after() -> None:
    rises = RiseTracker(k=2)
    assert rises.update(100, {"web": 3.0, "code": 2.0}) == []
    assert rises.update(200, {"web": 2.9, "code": 2.1}) == []  # code rose once
    assert rises.update(300, {"web": 2.8, "code": 2.2}) == [
        "validation loss of code rose at 2 evaluations in a row: 2.1000 -> 2.2000 at step 300"]
    assert len(rises.update(400, {"web": 2.7, "code": 2.3})) == 1
    assert rises.update(500, {"web": 2.6, "code": 2.25}) == []  # fell: the count starts again
    assert RiseTracker(k=0).update(1, {"web": 1.0}) == []


def test_the_progress_line_ends_with_the_validation_losses() -> None:
    val = {"val/loss": 3.25, "val/web/loss": 3.5, "val/code/loss": 3.0, "val/time_s": 1.23}
    assert format_validation(val) == " | val loss 3.2500 (web 3.5000, code 3.0000; 1.2 s)"


def test_validation_has_its_own_wandb_section_and_the_start_alert_says_it_is_on() -> None:
    from launch.eval_schema import describe
    from megatron_ext.metrics import panel_key

    assert panel_key("val/web_text_document/loss") == "val/web_text_document/loss"
    assert describe(make_config("data=synthetic")) == (
        "every 100 steps and after the last: 2 batches of 16 from each of synthetic")
    assert describe(make_config("train.eval_interval=0", "train.eval_iters=0")) == "off"

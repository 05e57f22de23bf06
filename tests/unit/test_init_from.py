"""A resume builds the embedding rows its checkpoint was saved with, whatever the new TP pads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from launch.config import to_yaml
from launch import ckpt_commit as commit
from megatron_ext.init_from import vocab_rows
from tests.conftest import make_config


def _saved(root: Path, rows: int) -> Path:
    """A committed step whose torch_dist metadata holds a ``rows``-row embedding, as a save of
    vocabulary 600 at TP=1 (640 rows) writes it."""
    cfg = make_config("model.vocab_size=600")
    step = root / commit.step_dir(3)
    dcp.save({"embedding.word_embeddings.weight": torch.zeros(rows, 8)}, checkpoint_id=step,
             no_dist=True)
    (step / "config.yaml").write_text(to_yaml(cfg))
    (step / commit.MARKER).write_text("{}")
    return root


def test_a_resume_keeps_the_saved_rows_and_refuses_a_tp_that_cannot_split_them(
        tmp_path: Path) -> None:
    model = make_config("model.vocab_size=600").model
    assert vocab_rows(str(tmp_path / "none"), model, tp=2) == 768  # no checkpoint: 256-multiple
    root = _saved(tmp_path / "ckpt", rows=640)
    assert vocab_rows(str(root), model, tp=2) == 640
    with pytest.raises(ValueError, match=r"parallel.tp=3 must divide the 640 embedding rows"):
        vocab_rows(str(root), model, tp=3)

"""Export a training run's checkpoint to Hugging Face: any layout, the newest committed step.

A few real training steps through ``python -m launch`` on 2 CPU ranks (TP=2, or PP=2 with
tied embeddings), then ``tools.convert_hf export``; transformers' LlamaForCausalLM on the
export must compute the logits megatron's own loader and GPTModel compute from that step.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from launch import ckpt_commit as commit
from tests.conftest import run_launch
from tests.integration.checkpoint_forward import checkpoint_logits
from tests.unit.megatron_forward import free_port
from tools.convert_hf import main

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

VOCAB = 500  # not a multiple of 128*TP: the stored embedding has padding rows to drop
TRAIN = ["data=synthetic", "model.num_layers=2", "model.hidden_size=64",
         "model.ffn_hidden_size=128", f"model.vocab_size={VOCAB}", "train.steps=4",
         "train.warmup_steps=1", "train.seq_length=32", "train.global_batch_size=4",
         "train.micro_batch_size=2", "train.log_interval=1", "checkpoint.save_interval=2"]


def megatron_logits(step_dir: Path, tokens: torch.Tensor, tp: int, tmp: Path) -> torch.Tensor:
    torch.multiprocessing.spawn(checkpoint_logits, nprocs=tp,
                                args=(tp, free_port(), str(step_dir), tokens, str(tmp / "l")))
    return torch.cat([torch.load(f"{tmp / 'l'}.{r}") for r in range(tp)], dim=-1)[..., :VOCAB]


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return transformers.LlamaForCausalLM.from_pretrained(folder).eval()(tokens).logits


@pytest.mark.parametrize("layout,tied,reference_tp", [("tp2", False, 1), ("pp2", True, 2)])
def test_export_of_the_newest_committed_step_computes_megatrons_logits(
        tmp_path: Path, capsys: pytest.CaptureFixture, layout: str, tied: bool,
        reference_tp: int) -> None:
    result = run_launch("name=export", f"parallel={layout}", *TRAIN,
                        f"model.untie_embeddings_and_output_weights={not tied}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ckpt = tmp_path / "runs" / "export" / "checkpoints"
    # Newer saves that never committed (step 2's weights, so reading one would show): one
    # killed while written, one renamed but without its marker.
    shutil.copytree(ckpt / commit.step_dir(2), ckpt / commit.tmp_dir(9))
    shutil.copytree(ckpt / commit.step_dir(2), ckpt / commit.step_dir(10))
    (ckpt / commit.step_dir(10) / commit.MARKER).unlink()

    assert main(["export", "--megatron", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert f"from {ckpt / commit.step_dir(4)}" in capsys.readouterr().out
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    expected = megatron_logits(ckpt / commit.step_dir(4), tokens, reference_tp, tmp_path)
    exported = hf_logits(tmp_path / "hf", tokens)
    assert exported.shape == expected.shape  # megatron's vocabulary padding is gone
    torch.testing.assert_close(exported, expected, atol=1e-4, rtol=1e-4)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.config.tie_word_embeddings is tied

    # A given committed step exports that step (and its weights differ from step 4's).
    assert main(["export", "--megatron", str(ckpt / commit.step_dir(2)),
                 "--out", str(tmp_path / "hf2")]) == 0
    assert (hf_logits(tmp_path / "hf2", tokens) - expected).abs().max() > 1e-3
    # Naming an uncommitted folder is refused, whichever way it is unfinished.
    for name in (commit.step_dir(10), commit.tmp_dir(9)):
        assert main(["export", "--megatron", str(ckpt / name), "--out", str(tmp_path / "x")]) == 1
        assert "is not a committed checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

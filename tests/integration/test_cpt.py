"""Continued pre-training end to end: JSONL -> prepare_data, an HF Llama -> convert_hf ->
``train.init_from``, through the user's launch command on 2 CPU ranks (TP=2), and the run's
checkpoint exported back to Hugging Face."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy
import pytest
import torch
from tokenizers import Tokenizer

from tests.conftest import run_launch
from tests.integration.conftest import read_metrics
from tools.convert_hf import import_hf, main, overrides
from tools.demo_data import train_tokenizer
from tools.prepare_data import prepare
from tools.text_filters import Options

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

VOCAB, SEQ = 512, 64
WORDS = ("the cat dog sat ran on a mat log red blue big small quick lazy fox jumps over and "
         "then home tree river stone light dark").split()


def write_corpus(path: Path, docs: int = 400) -> Path:
    """Sentences from a small grammar: learnable, so a trained model's loss is far below ln V."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(docs):
            text = " ".join(f"the {rng.choice(WORDS)} {rng.choice(WORDS)} on the "
                            f"{rng.choice(WORDS)}." for _ in range(rng.randint(3, 12)))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def windows(prefix: Path, count: int, rng: numpy.random.Generator) -> torch.Tensor:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    stream = numpy.concatenate([numpy.array(dataset[i]) for i in range(len(dataset))])
    starts = rng.integers(0, len(stream) - SEQ - 1, count)
    return torch.tensor(numpy.stack([stream[s:s + SEQ + 1] for s in starts]).astype(numpy.int64))


def pretrained_llama(folder: Path, prefix: Path) -> float:
    """A tiny Llama briefly trained on the corpus (the 'pretrained' model); its held-out loss."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = numpy.random.default_rng(0)
    for _ in range(150):
        batch = windows(prefix, 16, rng)
        loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    with torch.no_grad():
        held_out = windows(prefix, 32, numpy.random.default_rng(1))
        return model(held_out[:, :-1], labels=held_out[:, :-1]).loss.item()


def test_cpt_starts_from_the_converted_llama(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    corpus = write_corpus(tmp_path / "raw" / "part-0.jsonl")
    train_tokenizer(corpus, tmp_path / "tokenizer.json", VOCAB)
    prefix = tmp_path / "data" / "cpt_text_document"
    prepare([tmp_path / "raw"], tmp_path / "tokenizer.json", prefix, Options(dedup=True), workers=2)
    hf_loss = pretrained_llama(tmp_path / "hf", prefix)
    assert hf_loss < math.log(VOCAB) - 2  # the 'pretrained' model learned the grammar
    model = import_hf(tmp_path / "hf", tmp_path / "converted")

    result = run_launch(
        "name=cpt", "parallel=tp2", *overrides(model), f"train.init_from={tmp_path / 'converted'}",
        f"data.tokenizer={tmp_path / 'tokenizer.json'}", "data.prepare_demo=false",
        f"data.sources=[{{path: {prefix}, weight: 1.0}}]", "train.steps=10",
        "train.warmup_steps=1", "train.lr=1e-4", "train.min_lr=1e-5", f"train.seq_length={SEQ}",
        "train.log_interval=5", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = [row["loss"] for row in read_metrics(tmp_path, "cpt")]
    assert len(losses) == 10
    assert losses[0] == pytest.approx(hf_loss, abs=0.3)  # the pretrained model, not a random one
    assert losses[0] < math.log(VOCAB) - 2

    # Back to Hugging Face: the run's tokenizer comes along, its end-of-document token is the
    # eos, and the exported model scores held-out text as the last training steps did.
    assert main(["export", "--megatron", str(tmp_path / "runs" / "cpt" / "checkpoints"),
                 "--out", str(tmp_path / "cpt-hf")]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "cpt-hf")
    assert tokenizer("the cat sat").input_ids == Tokenizer.from_file(
        str(tmp_path / "tokenizer.json")).encode("the cat sat").ids
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "cpt-hf").eval()
    assert exported.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with torch.no_grad():
        held_out = windows(prefix, 32, numpy.random.default_rng(1))
        cpt_loss = exported(held_out[:, :-1], labels=held_out[:, :-1]).loss.item()
    assert cpt_loss == pytest.approx(losses[-1], abs=0.3)

    # A new run may start from the CPT run's own checkpoint (a different layout, a fresh
    # optimizer and schedule): it starts at step 1 from the trained weights.
    second = run_launch(
        "name=cpt-again", "parallel=pp2", *overrides(model),
        f"train.init_from={tmp_path / 'runs' / 'cpt' / 'checkpoints'}",
        f"data.tokenizer={tmp_path / 'tokenizer.json'}", "data.prepare_demo=false",
        f"data.sources=[{{path: {prefix}, weight: 1.0}}]", "train.steps=2",
        "train.warmup_steps=1", "train.lr=1e-4", "train.min_lr=1e-5", f"train.seq_length={SEQ}",
        "train.log_interval=1", cwd=tmp_path, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    again = read_metrics(tmp_path, "cpt-again")
    assert [row["step"] for row in again] == [1, 2]
    assert again[0]["loss"] == pytest.approx(losses[-1], abs=0.3)

"""Supervised fine-tuning end to end on CPU: a tiny instruction set the repo makes, prepared
with the chat template, fine-tuned from a (random) Hugging Face Llama through ``train.init_from``
with ``train=sft data=sft_example`` and packing, validated on the held-out conversation,
exported to Hugging Face; transformers' greedy decoding then answers each training prompt with
its trained answer.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_launch
from tests.integration.conftest import read_metrics
from tools import demo_chat
from tools.convert_hf import import_hf, main, overrides

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def random_llama(folder: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def test_fine_tuned_export_answers_the_training_prompts(tmp_path: Path) -> None:
    prefix = demo_chat.make(tmp_path / "sft-demo")
    model = import_hf(random_llama(tmp_path / "base"), tmp_path / "converted")
    result = run_launch(
        "name=sft", "train=sft", "data=sft_example", *overrides(model),
        f"train.init_from={tmp_path / 'converted'}", f"data.tokenizer={prefix.parent / 'tokenizer'}",
        f"data.sources=[{{path: {prefix}, weight: 1.0}}]", "train.epochs=0", "train.steps=60", "train.lr=1e-2",
        "train.min_lr=1e-3", "train.warmup_steps=5", "train.eval_interval=30",
        "checkpoint.save_interval=60", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_metrics(tmp_path, "sft")
    assert rows[-1]["loss"] < 0.1 < rows[0]["loss"]
    assert any("val/loss" in row for row in rows)  # the held-out conversation is scored

    assert main(["export", "--megatron", str(tmp_path / "runs" / "sft" / "checkpoints"),
                 "--out", str(tmp_path / "hf")]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    records = [json.loads(line) for line in (prefix.parent / "chat.jsonl").open()]
    trained = records[:7]  # data.split 90,10,0: the first 7 of 8 train, the last is held out
    for record in trained:
        question, answer = record["messages"]
        prompt = tokenizer.apply_chat_template([question], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = exported.generate(**prompt, max_new_tokens=24, do_sample=False)
        reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        assert reply == answer["content"], (question["content"], reply)

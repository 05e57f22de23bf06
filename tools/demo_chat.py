"""A tiny instruction set and a tokenizer with a Llama 3 style chat template, made here.

    python -m tools.demo_chat runs/sft-demo

writes ``chat.jsonl`` (question/answer conversations a tiny model learns in minutes on CPU),
``tokenizer/`` (a byte-level BPE trained on them, with Llama 3's header and end-of-turn
special tokens and its chat template in ``tokenizer_config.json``), then the prepared dataset
``sft_document`` (+ ``_loss_mask``) that ``data=sft_example`` reads. Nothing is downloaded.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
"""Llama 3's template, less its date and tool handling."""

COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
THINGS = ("apple", "river", "stone", "cloud", "lamp", "boat", "bird", "door")


def conversations() -> list[dict[str, list[dict[str, str]]]]:
    """``len(THINGS)`` one-turn questions, each with its own fixed answer."""
    out = []
    for thing, colour in zip(THINGS, COLOURS):
        out.append({"messages": [{"role": "user", "content": f"What colour is the {thing}?"},
                                 {"role": "assistant", "content": f"The {thing} is {colour}."}]})
    return out


def write_tokenizer(folder: Path, texts: list[str], vocab_size: int = 320) -> Path:
    """A BPE over ``texts`` with the chat special tokens; transformers loads the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    # eos is the end of a turn: generation stops there, and training pads with it
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>",
        "chat_template": CHAT_TEMPLATE}, indent=1))
    return folder


def make(out: Path, records: list[dict] | None = None) -> Path:
    """The instruction set, its tokenizer and the prepared dataset under ``out``; the prefix."""
    from tools.prepare_chat import prepare_chat

    records = records or conversations()
    out.mkdir(parents=True, exist_ok=True)
    chat = out / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in records))
    texts = [f"{m['role']}\n\n{m['content']}" for r in records for m in r["messages"]] * 20
    write_tokenizer(out / "tokenizer", texts)
    prefix = out / "sft_document"
    prepare_chat([chat], out / "tokenizer", prefix, max_tokens=65)
    return prefix


def main() -> int:
    print(make(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/sft-demo")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""tools.prepare_data --format chat: the template's own rendering, a loss mask on the answers
only, every dropped record counted by reason with file and line, and resumable shards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest

from tools import demo_chat
from tools.chat_data import encode, load_chat_tokenizer
from tools.prepare_data import main as prepare_main


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chat")
    demo_chat.make(out)
    return out


def read(prefix: str) -> list[numpy.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [numpy.array(dataset[i]) for i in range(len(dataset))]


def test_mask_keeps_the_answer_and_its_end_of_turn_only(chat_dir: Path) -> None:
    tokenizer = load_chat_tokenizer(chat_dir / "tokenizer")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What colour is the lamp?"},
                {"role": "assistant", "content": "The lamp is white."},
                {"role": "user", "content": "And the boat?"},
                {"role": "assistant", "content": "The boat is orange."}]
    ids, mask = encode(tokenizer, messages)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    answers = tokenizer.decode(ids[mask == 1])
    assert answers == "The lamp is white.<|eot_id|>The boat is orange.<|eot_id|>"
    # the prompt's tokens are those inference builds with the generation prompt
    prompt = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
    assert list(ids[:len(prompt)]) == list(prompt) and not mask[:len(prompt)].any()


def test_bad_records_counted_by_reason_with_line_and_rerun_reuses(chat_dir: Path,
                                                                  tmp_path: Path,
                                                                  capsys) -> None:
    good = {"prompt": "What colour is the bird?", "response": "The bird is purple."}
    rows = [json.dumps(good), "{not json",
            json.dumps({"messages": [{"content": "hi"}]}),
            json.dumps({"messages": [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "  "}]}),
            json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            json.dumps({"prompt": "What colour is the stone? " * 30, "response": "Blue."}),
            json.dumps({"text": "pre-training text"})]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(rows) + "\n")
    prefix = tmp_path / "out"
    argv = ["--format", "chat", "--input", str(data), "--tokenizer", str(chat_dir / "tokenizer"),
            "--output-prefix", str(prefix), "--max-tokens", "64", "--keep-shards"]
    assert prepare_main(argv) == 0
    stats = json.loads(Path(f"{prefix}.stats.json").read_text())
    assert stats["total"]["conversations"] == 7 and stats["total"]["kept"] == 1
    assert stats["total"]["packed_sequences"] == 1
    assert stats["dropped"] == {"invalid JSON": 1, "message without a role": 1, "empty answer": 1,
                                "no assistant turn": 1, "longer than --max-tokens": 1,
                                "no 'messages' or 'prompt'/'response' field": 1}
    examples = stats["files"][0]["dropped_examples"]
    assert f"{data}:2: invalid JSON" in examples[0] and f"{data}:6: longer" in examples[4]
    assert "mixed.jsonl:4: empty answer" in capsys.readouterr().out
    (ids,), (mask,) = read(str(prefix)), read(f"{prefix}_loss_mask")
    assert len(ids) == len(mask) and mask.sum() == stats["total"]["answer_tokens"] > 0
    assert prepare_main(argv) == 0
    again = json.loads(Path(f"{prefix}.stats.json").read_text())
    assert again["files"][0]["skipped"] and again["dropped"] == stats["dropped"]
    assert list(read(str(prefix))[0]) == list(ids)


def test_a_tokenizer_without_chat_template_is_refused(chat_dir: Path, tmp_path: Path,
                                                      capsys) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "tokenizer.json").write_bytes((chat_dir / "tokenizer" / "tokenizer.json").read_bytes())
    config = json.loads((chat_dir / "tokenizer" / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    argv = ["--format", "chat", "--input", str(chat_dir / "chat.jsonl"), "--tokenizer",
            str(plain), "--output-prefix", str(tmp_path / "out")]
    assert prepare_main(argv) == 1
    assert "has no chat template" in capsys.readouterr().err


def test_pre_training_filters_are_refused_with_chat(chat_dir: Path, tmp_path: Path,
                                                   capsys) -> None:
    argv = ["--format", "chat", "--input", str(chat_dir / "chat.jsonl"), "--tokenizer",
            str(chat_dir / "tokenizer"), "--output-prefix", str(tmp_path / "out"), "--dedup"]
    assert prepare_main(argv) == 1
    assert "--dedup: pre-training filters; --format chat takes" in capsys.readouterr().err
    assert not (tmp_path / "out.shards").exists()
    # the corpus stages added beside chat (paragraph dedup, earlier corpora, perplexity) too
    assert prepare_main(argv[:-1] + ["--paragraph-dup", "0.8", "--dedup-against", str(tmp_path / "old")]) == 1
    assert "--paragraph-dup, --dedup-against: pre-training filters" in capsys.readouterr().err

"""tools.prepare_data: filters, counts, resumability, and output megatron reads back."""
from __future__ import annotations

from pathlib import Path

import numpy
import pytest

from tools import prepare_data
from tools.demo_data import EOD_TOKEN, train_tokenizer
from launch.tokenizer import load_tokenizer
from tools.prepare_data import main, prepare, token_dtype
from tools.text_filters import Options, apply, dedup_key, redact
from tests.corpus import write_jsonl

DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Contact me at jane.doe@example.org or +1 (415) 555-0100 after 2024-01-15 12:30.",
    "THE QUICK  BROWN FOX jumps over the lazy dog. " * 3,  # a duplicate up to case and spaces
    "short",
    "Ｆｕｌｌ－ｗｉｄｔｈ text and the ﬁ ligature become plain under NFKC, it said.",
]



@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(folder / "corpus.jsonl", DOCS * 20)
    train_tokenizer(corpus, folder / "tokenizer.json", vocab_size=300)
    return folder / "tokenizer.json"


def read_dataset(prefix: Path) -> list[numpy.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [numpy.array(dataset[i]) for i in range(len(dataset))]  # copies: the mmap closes


def test_filters_normalise_key_and_redact() -> None:
    assert dedup_key(DOCS[0]) == dedup_key(DOCS[2]) != dedup_key(DOCS[1])
    assert apply("ｆｕｌｌ", Options(nfkc=True)).text == "full"
    assert apply("tiny", Options(min_chars=10)).text is None
    text, counts = redact(DOCS[1])
    assert counts == {"email": 1, "phone": 1}
    assert "[EMAIL]" in text and "[PHONE]" in text and "2024-01-15 12:30" in text
    assert redact("IP 10.200.30.40, version 1.22.333.4444, uuid 0001-0203-0405-0607-0809")[1] \
        == {"email": 0, "phone": 0}


def test_token_dtype_follows_megatron() -> None:
    assert token_dtype(512) is numpy.uint16 and token_dtype(128256) is numpy.int32


def test_dedup_min_chars_pii_counts_and_exact_tokens(tokenizer: Path, tmp_path: Path) -> None:
    inputs = [write_jsonl(tmp_path / "a.jsonl", DOCS), write_jsonl(tmp_path / "b.jsonl", DOCS[:2])]
    options = Options(nfkc=True, min_chars=10, dedup=True, redact_pii=True)
    report = prepare(inputs, tokenizer, tmp_path / "out" / "ds", options, workers=2)
    assert [r["kept"] for r in report["files"]] == [3, 0]  # b.jsonl repeats a.jsonl
    assert report["total"] | {"tokens": 0} == {"documents": 7, "kept": 3, "duplicates": 3,
                                               "too_short": 1, "email": 1, "phone": 1, "tokens": 0}
    docs = read_dataset(tmp_path / "out" / "ds")
    tok, eod = load_tokenizer(tokenizer)
    assert eod == tok.token_to_id(EOD_TOKEN)
    expected = [apply(DOCS[i], options).text for i in (0, 1, 4)]
    assert [d.tolist() for d in docs] == [tok.encode(t).ids + [eod] for t in expected]
    assert sum(len(d) for d in docs) == report["total"]["tokens"]
    assert docs[0].dtype == numpy.uint16
    assert not (tmp_path / "out" / "ds.shards").exists()  # removed after the merge


def test_rerun_skips_finished_shards_and_keeps_dedup(tokenizer: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = [write_jsonl(tmp_path / "a.jsonl", DOCS), write_jsonl(tmp_path / "b.jsonl", DOCS[:2])]
    prefix, options = tmp_path / "ds", Options(dedup=True)
    first = prepare(inputs, tokenizer, prefix, options, keep_shards=True)
    written: list[Path] = []
    real = prepare_data.write_shard
    monkeypatch.setattr(prepare_data, "write_shard",
                        lambda path, *a, **k: written.append(path) or real(path, *a, **k))
    write_jsonl(tmp_path / "b.jsonl", DOCS[:2] + ["a new document about megatron datasets"])
    second = prepare(inputs, tokenizer, prefix, options, keep_shards=True)
    assert written == [tmp_path / "b.jsonl"]  # a.jsonl's shard was reused
    assert second["files"][0].get("skipped") and second["files"][0]["tokens"] == \
        first["files"][0]["tokens"]
    assert second["files"][1]["duplicates"] == 2 and second["files"][1]["kept"] == 1
    assert len(read_dataset(prefix)) == first["total"]["kept"] + 1


def test_cli_reports_per_file_tokens_and_parquet(tokenizer: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    pq.write_table(pyarrow.table({"body": DOCS}), tmp_path / "p.parquet")
    assert main(["--input", str(tmp_path), "--tokenizer", str(tokenizer.parent),
                 "--output-prefix", str(tmp_path / "ds"), "--text-key", "body",
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "p.parquet" in out and "total" in out and "tokens/s" in out
    assert len(read_dataset(tmp_path / "ds")) == len(DOCS)
    assert main(["--input", str(tmp_path / "nothing"), "--tokenizer", str(tokenizer),
                 "--output-prefix", str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_training_reads_a_llama_3_style_tokenizer_s_end_of_text(tmp_path: Path) -> None:
    """Llama 3 ends documents with <|end_of_text|>; data prep and training agree on its id."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_ext.data import HFTokenizer

    vocab = {"<|begin_of_text|>": 0, "hello": 1, "world": 2, "<|end_of_text|>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="hello"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "llama3-tokenizer"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    for path in (folder, folder / "tokenizer.json"):  # the directory or the file
        training = HFTokenizer(str(path))
        assert training.eod == 3 == load_tokenizer(path)[1]
        assert training.tokenize("hello world") == [1, 2]

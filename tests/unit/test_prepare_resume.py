"""tools.prepare_data reruns: a resumed run writes what a fresh run writes, whatever changed."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tools.demo_data import train_tokenizer
from tools.prepare_data import prepare
from tools.text_filters import Options
from tests.corpus import write_jsonl

A = [f"document {i} of file a, about tokenizers and datasets and more words" for i in range(6)]
B = [f"document {i} of file b, about checkpoints and layouts and more words" for i in range(4)]
SHARED = "a document both files hold, word for word, about data curation"



@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(folder / "corpus.jsonl", (A + B + [SHARED]) * 10)
    train_tokenizer(corpus, folder / "one.json", vocab_size=300)
    train_tokenizer(corpus, folder / "two.json", vocab_size=280)
    return folder / "one.json", folder / "two.json"


def outputs(prefix: Path) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def fresh(data: Path, tokenizer: Path, tmp: Path, options: Options) -> dict:
    """A fresh run over a copy of ``data``, so its output can be compared byte for byte."""
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(data, tmp / "data")
    return prepare([tmp / "data"], tokenizer, tmp / "ds", options)


@pytest.mark.parametrize("change", ["duplicate appended to an earlier file",
                                    "shared document removed from the earlier file",
                                    "earlier-sorting file added"])
def test_a_resumed_dedup_run_writes_what_a_fresh_run_writes(
        change: str, tokenizers: tuple[Path, Path], tmp_path: Path) -> None:
    data, prefix, options = tmp_path / "data", tmp_path / "ds", Options(dedup=True)
    write_jsonl(data / "a.jsonl", A + [SHARED])
    write_jsonl(data / "b.jsonl", B + [SHARED])
    prepare([data], tokenizers[0], prefix, options, keep_shards=True)
    if change.startswith("duplicate"):
        write_jsonl(data / "a.jsonl", A + [SHARED, B[0]])  # b.jsonl's shard is reused
    elif change.startswith("shared"):
        write_jsonl(data / "a.jsonl", A)  # b.jsonl's copy of SHARED is now the first one
    else:
        write_jsonl(data / "0.jsonl", [B[1], A[2]])  # sorts first: its copies win
    resumed = prepare([data], tokenizers[0], prefix, options, keep_shards=True)
    assert any(r.get("skipped") for r in resumed["files"])  # something was reused
    reference = fresh(data, tokenizers[0], tmp_path / "fresh", options)
    assert outputs(prefix) == outputs(tmp_path / "fresh" / "ds")
    assert resumed["total"] == reference["total"]
    assert [r["kept"] for r in resumed["files"]] == [r["kept"] for r in reference["files"]]


def test_a_tokenizer_replaced_in_place_makes_every_shard_stale(
        tokenizers: tuple[Path, Path], tmp_path: Path) -> None:
    data, prefix = tmp_path / "data", tmp_path / "ds"
    write_jsonl(data / "a.jsonl", A)
    tokenizer = tmp_path / "tok" / "tokenizer.json"
    tokenizer.parent.mkdir()
    shutil.copy(tokenizers[0], tokenizer)
    prepare([data], tokenizer, prefix, Options(), keep_shards=True)
    shutil.copy(tokenizers[1], tokenizer)  # same path, other contents
    again = prepare([data], tokenizer, prefix, Options(), keep_shards=True)
    assert not again["files"][0].get("skipped")
    shutil.copy(tokenizers[1], tmp_path / "other.json")
    prepare([data], tmp_path / "other.json", tmp_path / "ref", Options())
    assert outputs(prefix) == outputs(tmp_path / "ref")


def test_a_file_named_twice_is_read_once(tokenizers: tuple[Path, Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_jsonl(data / "a.jsonl", A)
    report = prepare([data, data / "a.jsonl", tmp_path / "data" / ".." / "data" / "a.jsonl"],
                     tokenizers[0], tmp_path / "ds", Options(dedup=True))
    assert [Path(r["file"]).name for r in report["files"]] == ["a.jsonl"]
    assert report["total"]["documents"] == report["total"]["kept"] == len(A)

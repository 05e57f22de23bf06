"""tools.prepare_data input: every malformed record counted by reason, named by file and line;
no record ends a run."""
from __future__ import annotations

import codecs
import gzip
import json
from pathlib import Path

import pytest

from tools.curation.records import TextField, input_files, read_records
from tools.demo_data import train_tokenizer
from tools.prepare_data import main, prepare
from tools.text_filters import Options

GOOD = "a well-formed document about data preparation"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    (folder / "c.jsonl").write_text(json.dumps({"text": GOOD}) + "\n")
    train_tokenizer(folder / "c.jsonl", folder / "tokenizer.json", vocab_size=260)
    return folder / "tokenizer.json"


def bad_jsonl(path: Path) -> Path:
    lines = [codecs.BOM_UTF8 + json.dumps({"text": GOOD}).encode(),  # 1: BOM, then good
             b'{"text": null}', b'{"text": 42}', b"[1, 2]", b'{"body": "x"}',
             b'{"text": "lone \\ud800 surrogate"}', b'{"text": "caf\xe9"}', b"{not json",
             b"", json.dumps({"text": GOOD + " two"}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_each_defect_has_its_reason_and_line(tmp_path: Path) -> None:
    records = list(read_records(bad_jsonl(tmp_path / "x.jsonl"), TextField()))
    assert [(r.line, r.problem) for r in records] == [
        (1, ""), (2, "'text' is null"), (3, "'text' is not a string (int)"),
        (4, "not a JSON object (list)"), (5, "no 'text' field"), (6, "lone surrogate"),
        (7, "not UTF-8"), (8, "invalid JSON"), (10, "")]
    assert records[0].text == GOOD


def test_gzip_parquet_and_a_folder(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": GOOD}) + "\n")
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 50)[:40])
    pq.write_table(pyarrow.table({"text": [GOOD, None]}), tmp_path / "n.parquet")
    pq.write_table(pyarrow.table({"body": [GOOD]}), tmp_path / "col.parquet")
    (tmp_path / "fake.parquet").write_text("not parquet")
    files = input_files([tmp_path])
    assert [p.name for p in files] == ["col.parquet", "cut.jsonl.gz", "fake.parquet",
                                       "n.parquet", "z.jsonl.gz"]
    got = {p.name: [(r.line, r.problem) for r in read_records(p, TextField())] for p in files}
    assert got["z.jsonl.gz"] == [(1, "")]
    assert got["n.parquet"] == [(1, ""), (2, "'text' is null")]
    assert got["col.parquet"] == [(0, "no 'text' column")]
    assert got["fake.parquet"] == [(0, "not a Parquet file")]
    assert got["cut.jsonl.gz"][-1][1] == "unreadable file"


def test_a_run_counts_and_names_malformed_records(tokenizer: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    data.mkdir()
    bad = bad_jsonl(data / "x.jsonl")
    with gzip.open(data / "z.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": GOOD + " zipped"}) + "\n")
    report = prepare([data], tokenizer, tmp_path / "ds", Options())
    assert report["total"]["kept"] == 3 and report["total"]["documents"] == 10
    assert report["malformed"] == {"'text' is null": 1, "'text' is not a string (int)": 1,
                                   "not a JSON object (list)": 1, "no 'text' field": 1,
                                   "lone surrogate": 1, "not UTF-8": 1, "invalid JSON": 1}
    assert report["stages"][1] == {"stage": "well-formed", "in": 10, "out": 3,
                                   "retention_pct": 30.0}
    assert f"{bad}:7: not UTF-8" in report["files"][0]["malformed_examples"][5]
    stats = json.loads(Path(f"{tmp_path / 'ds'}.stats.json").read_text())
    assert stats["malformed"] == report["malformed"]
    assert main(["--input", str(data), "--tokenizer", str(tokenizer), "--workers", "1",
                 "--output-prefix", str(tmp_path / "again")]) == 0
    out = capsys.readouterr().out
    assert "malformed 1: lone surrogate" in out and f"{bad}:2: 'text' is null" in out


@pytest.mark.parametrize("flags, message", [
    (["--pii", "email=mask"], "--pii 'email=mask': expected CLASS=POLICY"),
    (["--pii-locale", "mars"], "--pii-locale 'mars': expected one of"),
    (["--languages", "xx"], "--languages 'xx': not an ISO 639-1 code"),
    (["--near-dup", "1.5"], "--near-dup 1.5: expected a Jaccard similarity")])
def test_bad_flags_are_one_line_before_anything_runs(flags: list[str], message: str,
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert main(["--input", str(tmp_path / "absent"), "--tokenizer", str(tmp_path),
                 "--output-prefix", str(tmp_path / "ds"), *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1

"""Corpus-wide dedup beyond whole documents: boilerplate paragraphs repeated across documents
(first copy kept, deterministic under resume), and documents of an earlier prepared corpus
excluded from a later one (``--dedup-against``)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy
import pytest

from launch.tokenizer import load_tokenizer
from tools.curation import paragraphs
from tools.demo_data import train_tokenizer
from tools import prepare_data
from tools.prepare_data import main, prepare
from tools.text_filters import Options
from tests.corpus import write_jsonl

COOKIES = ("We use cookies to improve your experience on our website. By continuing to browse "
           "you agree to our use of cookies and to our privacy policy.")
LICENSE = ("This program is free software: you can redistribute it and/or modify it under the "
           "terms of the GNU General Public License as published by the Free Software Foundation.")
BODIES = [f"Article {i}: the council discussed the {topic} on {day}, and the members voted to "
          f"spend more on it next year after a long debate about the costs and benefits."
          for i, (topic, day) in enumerate([("library", "Monday"), ("bus service", "Tuesday"),
                                            ("harbour", "Friday"), ("school roof", "Sunday"),
                                            ("market square", "Thursday")])]



def read_dataset(prefix: Path) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [numpy.array(dataset[i]).tolist() for i in range(len(dataset))]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(write_jsonl(folder / "c.jsonl", (BODIES + [COOKIES, LICENSE]) * 5),
                    folder / "t.json", 400)
    return folder / "t.json"


def test_removing_paragraphs_keeps_the_rest_and_its_layout() -> None:
    text = f"Title\n\n{COOKIES}\n\n\n{BODIES[0]}\n\nend"
    assert paragraphs.remove(text, (1,)) == f"Title\n\n{BODIES[0]}\n\nend"
    assert paragraphs.remove(text, (3,)) == f"Title\n\n{COOKIES}\n\n\n{BODIES[0]}"
    assert paragraphs.remove(text, (0, 1, 2, 3)) == ""
    assert [p[0] for p in paragraphs.fingerprints(text)] == [1, 2]  # "Title", "end": too short


def test_boilerplate_paragraphs_go_but_their_first_copy(tokenizer: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    cookies2 = COOKIES.replace("policy.", "policies.")  # one word changed: still the notice
    docs_a = [f"{BODIES[0]}\n\n{COOKIES}", f"{LICENSE}\n\n{BODIES[1]}"]
    docs_b = [f"{BODIES[2]}\n\n{cookies2}\n\n{LICENSE}", COOKIES, f"Short\n\n{BODIES[3]}"]
    write_jsonl(tmp_path / "in" / "a.jsonl", docs_a)
    write_jsonl(tmp_path / "in" / "b.jsonl", docs_b)
    prefix = tmp_path / "ds"
    assert main(["--input", str(tmp_path / "in"), "--tokenizer", str(tokenizer), "--workers",
                 "1", "--output-prefix", str(prefix), "--paragraph-dup", "0.7"]) == 0
    tok, eod = load_tokenizer(tokenizer)
    expected = [docs_a[0], docs_a[1], BODIES[2], f"Short\n\n{BODIES[3]}"]
    assert read_dataset(prefix) == [tok.encode(t).ids + [eod] for t in expected]
    stats = json.loads(Path(f"{prefix}.stats.json").read_text())
    a = tmp_path / "in" / "a.jsonl"
    assert stats["paragraphs"] | {"largest": []} == {
        "removed": 3, "characters_removed": len(cookies2) + len(LICENSE) + len(COOKIES),
        "characters_removed_pct": round(100 * (len(cookies2) + len(LICENSE) + len(COOKIES))
                                        / sum(map(len, docs_a + docs_b)), 2),
        "clusters": 2, "largest": []}
    assert {(c["canonical"], c["copies_removed"]) for c in stats["paragraphs"]["largest"]} == \
        {(f"{a}:1 paragraph 2", 2), (f"{a}:2 paragraph 1", 1)}
    assert [r["paragraphs_removed"] for r in stats["files"]] == [0, 3]
    stage = next(s for s in stats["stages"] if s["stage"] == "paragraph dedup")
    assert (stage["in"], stage["out"]) == (5, 4)  # the bare notice had nothing left
    assert stats["dropped"] == {"paragraph dedup": 1}
    assert "paragraphs removed: 3" in capsys.readouterr().out


def test_a_resumed_run_removes_the_paragraphs_a_fresh_run_removes(
        tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """b.jsonl's file is unchanged, but its notice's first copy left a.jsonl: a fresh run
    keeps it there, so its shard is stale; c.jsonl's is not."""
    data, options = tmp_path / "data", Options(paragraph_dup=0.8, dedup=True)
    write_jsonl(data / "a.jsonl", [f"{BODIES[0]}\n\n{COOKIES}", BODIES[1]])
    write_jsonl(data / "b.jsonl", [f"{BODIES[2]}\n\n{COOKIES}"])
    write_jsonl(data / "c.jsonl", [BODIES[3]])
    prepare([data], tokenizer, tmp_path / "ds", options, keep_shards=True)
    write_jsonl(data / "a.jsonl", [BODIES[1]])
    hashed: list[int] = []
    real = prepare_data._fingerprint
    monkeypatch.setattr(prepare_data, "_fingerprint",
                        lambda items: hashed.extend(n for n, _ in items) or real(items))
    resumed = prepare([data], tokenizer, tmp_path / "ds", options, keep_shards=True)
    assert [bool(r.get("skipped")) for r in resumed["files"]] == [False, False, True]
    assert hashed == [1]  # only a.jsonl's one document: b's and c's fingerprints were kept
    shutil.copytree(data, tmp_path / "fresh")
    fresh = prepare([tmp_path / "fresh"], tokenizer, tmp_path / "ref", options)
    assert Path(tmp_path / "ds.bin").read_bytes() == Path(tmp_path / "ref.bin").read_bytes()
    assert resumed["paragraphs"]["removed"] == fresh["paragraphs"]["removed"] == 0


def test_a_later_corpus_excludes_an_earlier_one_s_documents(tokenizer: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    earlier = tmp_path / "pretrain"
    write_jsonl(tmp_path / "pt" / "a.jsonl", BODIES[:3])
    assert main(["--input", str(tmp_path / "pt"), "--tokenizer", str(tokenizer), "--workers",
                 "1", "--output-prefix", str(earlier), "--dedup", "--near-dup", "0.7"]) == 0
    index = numpy.load(f"{earlier}.dedup.npz")
    assert index["key"].shape == (3, 16) and index["signature"].shape == (3, 64)
    near = BODIES[1].replace("benefits.", "benefit.")
    write_jsonl(tmp_path / "cpt" / "b.jsonl", [BODIES[3], BODIES[0].upper(), near, BODIES[4]])
    later = tmp_path / "cpt_ds"
    assert main(["--input", str(tmp_path / "cpt"), "--tokenizer", str(tokenizer), "--workers",
                 "1", "--output-prefix", str(later), "--near-dup", "0.7",
                 "--dedup-against", str(earlier)]) == 0
    tok, eod = load_tokenizer(tokenizer)
    assert read_dataset(later) == [tok.encode(t).ids + [eod] for t in (BODIES[3], BODIES[4])]
    stats = json.loads(Path(f"{later}.stats.json").read_text())
    stage = next(s for s in stats["stages"] if s["stage"] == "earlier corpora")
    assert (stage["in"], stage["out"]) == (4, 2) and stats["files"][0]["earlier_duplicates"] == 2
    assert {c["canonical"] for c in stats["clusters"]["largest"]} == {f"{earlier}#0",
                                                                      f"{earlier}#1"}
    assert numpy.load(f"{later}.dedup.npz")["key"].shape == (2, 16)  # chains: CPT 2 vs both
    assert f"2 of earlier corpora ({earlier})" in capsys.readouterr().out
    assert main(["--input", str(tmp_path / "cpt"), "--tokenizer", str(tokenizer),
                 "--output-prefix", str(tmp_path / "x"), "--dedup-against",
                 str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert "--dedup-against" in err and len(err.splitlines()) == 1
    assert not Path(f"{tmp_path / 'x'}.shards").exists()  # refused before anything was read
    assert main(["--input", str(tmp_path / "cpt"), "--tokenizer", str(tokenizer),
                 "--output-prefix", str(later), "--dedup-against", str(later)]) == 1
    assert "own output" in capsys.readouterr().err  # a rerun would drop everything


def test_an_index_without_keys_still_excludes_near_copies(tmp_path: Path) -> None:
    """A corpus prepared with --near-dup alone has no exact keys (its shards store zeros):
    its index holds signatures only, and a later run matches against those."""
    from tools.curation import dedup_index, minhash
    from tools.curation.selection import select

    sigs = numpy.stack([minhash.signature(t) for t in BODIES[:2]])
    earlier = [{"key": numpy.zeros((2, 16), numpy.uint8), "line": numpy.array([1, 2]),
                "signature": sigs}]
    index = dedup_index.load(dedup_index.write(tmp_path / "pt", earlier, [numpy.ones(2, bool)],
                                               keys=False, signatures=True))
    assert set(index) == {"signature"}
    ours = {"key": numpy.stack([numpy.frombuffer(bytes([i]) * 16, numpy.uint8) for i in (1, 2)]),
            "line": numpy.array([1, 2]),
            "signature": numpy.stack([minhash.signature(BODIES[1]), minhash.signature(BODIES[4])])}
    chosen = select([ours], dedup=True, near_dup=0.8, earlier=[index])
    assert chosen.keep[0].tolist() == [False, True] and chosen.earlier == [1]

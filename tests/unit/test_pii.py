"""PII detectors per data class on a labelled corpus of real-looking positives and negatives
(tests/data/pii_corpus.jsonl: GPL notices, ZIP+4, clause numbers, number runs, dates, code,
git remotes, locales as negatives; national phone formats, non-ASCII e-mails, cards, IBANs
as positives), and what each policy does to a document."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from tools.curation import pii
from tools.curation.pii_eval import evaluate
from tools.demo_data import train_tokenizer
from tools.prepare_data import prepare
from tools.text_filters import Options, apply

CORPUS = REPO / "tests" / "data" / "pii_corpus.jsonl"


@pytest.mark.parametrize("kind", pii.CLASSES)
def test_precision_and_recall_per_class_on_the_labelled_corpus(kind: str) -> None:
    score = evaluate(CORPUS)[kind]
    assert score["tp"] >= 2  # the corpus has positives of every class
    assert score["precision"] >= 0.95, score["mistakes"]
    assert score["recall"] >= 0.9, score["mistakes"]


def test_the_false_positives_of_issue_27_are_gone() -> None:
    policy = pii.Policy.parse("default", "us,de")
    for text in ("Boston, MA 02110-1301 USA", "sizes 1024 2048 4096", "clause 12.3.4567",
                 "return x@self.weight.T", "git@github.com:NVIDIA/Megatron-LM.git",
                 "sd_IN@devanagari.UTF-8", "on 2024-01-15 12:30"):
        assert pii.detect(text, policy) == [], text


def test_policies_redact_drop_or_count_and_code_is_exempt() -> None:
    text = "Mail jane.doe@example.org or call +1 (415) 555-0100."
    redacted = apply(text, Options(redact_pii=True))
    assert redacted.text == "Mail [EMAIL] or call [PHONE]."
    assert redacted.pii == {"email": 1, "phone": 1}
    assert [kind for kind, _ in redacted.audit] == ["email", "phone"]
    dropped = apply(text, Options(redact_pii=True, pii="email=drop,phone=redact"))
    assert dropped.text is None and dropped.drop == "pii: email"
    counted = apply(text, Options(redact_pii=True, pii="email=count,phone=count"))
    assert counted.text == text and counted.pii == {"email": 1, "phone": 1}
    assert apply(text, Options(redact_pii=True), exempt_pii=True).text == text
    german = apply("Tel. 030/1234567", Options(redact_pii=True, pii_locale="de"))
    assert german.text == "Tel. [PHONE]"
    assert apply("Tel. 030/1234567", Options(redact_pii=True, pii_locale="us")).pii["phone"] == 0


def test_code_sources_are_exempt_in_a_run(tmp_path: Path) -> None:
    docs = ["ping jane.doe@example.org about the release notes please"]
    for name in ("web.jsonl", "code.jsonl"):
        (tmp_path / name).write_text(json.dumps({"text": docs[0]}) + "\n")
    train_tokenizer(tmp_path / "web.jsonl", tmp_path / "tok.json", vocab_size=260)
    report = prepare([tmp_path / "code.jsonl", tmp_path / "web.jsonl"], tmp_path / "tok.json",
                     tmp_path / "ds", Options(redact_pii=True), code_sources=("*/code*",))
    assert [r["pii"].get("email", 0) for r in report["files"]] == [0, 1]

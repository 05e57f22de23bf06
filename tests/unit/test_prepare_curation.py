"""tools.prepare_data's curation stages end to end: language id and filter, quality rules,
near-duplicates across files, and the metrics and provenance in <prefix>.stats.json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.blend_report import source_languages
from tools.curation import quality
from tools.demo_data import train_tokenizer
from tools.prepare_data import main
from tests.corpus import write_jsonl

EN = ("The committee met on Tuesday to review the budget for the coming year, and after a long "
      "discussion the members agreed that the library would receive more money for books, while "
      "the sports hall would have to wait until the roof was repaired. Several residents asked "
      "whether the bus service could run later in the evening, because many of them work late "
      "shifts in the hospital and they have no other way to get home safely at night.")
DE = ("Der Ausschuss traf sich am Dienstag, um den Haushalt für das kommende Jahr zu prüfen, und "
      "nach einer langen Diskussion waren sich die Mitglieder einig, dass die Bibliothek mehr Geld "
      "für Bücher erhalten soll, während die Sporthalle warten muss, bis das Dach repariert ist. "
      "Mehrere Anwohner fragten, ob der Bus am Abend länger fahren könnte, weil viele von ihnen "
      "im Krankenhaus spät arbeiten und sie keinen anderen Weg haben, nachts sicher heimzukommen.")
DE2 = ("Im Sommer wird der Marktplatz der Stadt neu gestaltet. Die Bürger konnten in einer "
       "Umfrage sagen, welche Bäume gepflanzt werden sollen und wo die neuen Bänke stehen. Die "
       "meisten wünschten sich mehr Schatten und einen Brunnen für die Kinder, und der Rat hat "
       "zugesagt, dass die Arbeiten vor dem Herbst fertig sind, damit der Wochenmarkt wieder "
       "wie gewohnt am Samstag stattfinden kann und die Händler nicht lange ausweichen müssen.")
SPAM = "\n".join(["Jetzt billige Uhren kaufen und beim Einkauf sparen, solange der Vorrat "
                  "reicht"] * 30)



@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(write_jsonl(folder / "c.jsonl", [EN, DE, DE2] * 5), folder / "t.json", 400)
    return folder / "t.json"


def test_quality_rules_name_what_a_document_breaks() -> None:
    assert quality.reason(EN, "en") == "" and quality.reason(DE, "de") == ""
    assert quality.reason(SPAM, "en") == "repeated lines"
    assert quality.reason("too few words here", "en") == "word count"
    assert quality.reason(" ".join(["#tag"] * 60), "en") == "symbol ratio"
    assert quality.reason(" ".join(["1234 5678"] * 40), "en") == "non-alphabetic words"
    assert quality.reason(EN.replace(" the ", " a ").replace("The ", "A "), "en") == ""
    stopless = " ".join(w for w in EN.split() if w.lower() not in quality.STOPWORDS["en"])
    assert quality.reason(stopless, "en") == "stopwords"
    assert quality.reason("日本語の文章です。" * 3, "ja") == ""  # no word rules without spaces


def test_stats_hold_every_stage_languages_clusters_and_pii(tokenizer: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    near = DE.replace("Dienstag", "Mittwoch")  # one word changed: a near-duplicate
    write_jsonl(tmp_path / "in" / "a.jsonl", [DE, EN, SPAM, DE2 + " Mail: amt@stadt.de"])
    write_jsonl(tmp_path / "in" / "b.jsonl", [near, DE, "kurz"])
    prefix = tmp_path / "ds"
    assert main(["--input", str(tmp_path / "in"), "--tokenizer", str(tokenizer), "--workers",
                 "1", "--output-prefix", str(prefix), "--dedup", "--near-dup", "0.7",
                 "--languages", "de", "--quality", "--min-chars", "10", "--redact-pii"]) == 0
    stats = json.loads(Path(f"{prefix}.stats.json").read_text())
    assert [(s["stage"], s["out"]) for s in stats["stages"]] == [
        ("read", 7), ("well-formed", 7), ("paragraph dedup", 7), ("length", 6), ("language", 5),
        ("quality", 4), ("perplexity", 4), ("pii (dropped)", 4), ("earlier corpora", 4), ("exact dedup", 3),
        ("near dedup", 2)]
    assert stats["stages"][-1]["retention_pct"] == 66.67  # 2 of 3, in %, 2 decimals
    assert stats["dropped"] == {"too short": 1, "language": 1, "quality: repeated lines": 1}
    assert list(stats["languages"]) == ["de"] and stats["languages"]["de"]["documents"] == 2
    assert stats["languages"]["de"]["tokens"] == stats["total"]["tokens"]
    a = str(tmp_path / "in" / "a.jsonl")
    assert {(c["kind"], c["canonical"], c["copies_dropped"])
            for c in stats["clusters"]["largest"]} == {("exact", f"{a}:1", 1),
                                                       ("near", f"{a}:1", 1)}
    assert stats["pii"]["email"] == {"hits": 1, "documents": 1, "document_rate_pct": 50.0}
    audit = [json.loads(x) for x in Path(f"{prefix}.pii_audit.jsonl").read_text().splitlines()]
    assert audit == [{"class": "email", "file": a, "line": 4,
                      "context": (DE2 + " Mail: amt@stadt.de")[-40 - len("amt@stadt.de"):]}]
    out = capsys.readouterr().out
    assert "near dedup" in out and "de " in out and f"{a}:1 (near)" in out
    assert source_languages(str(prefix)) == {"de": stats["total"]["tokens"]}

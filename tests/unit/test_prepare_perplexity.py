"""The optional perplexity filter: a character model of a reference text the user provides keeps
in-domain documents and drops gibberish and boilerplate, as its own stage."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tools.curation import perplexity
from tools.curation.perplexity import CharModel
from tools.demo_data import train_tokenizer
from tools.prepare_data import main, prepare
from tools.text_filters import Options
from tests.corpus import write_jsonl

TOPICS = ["library", "bus service", "harbour", "school roof", "market square", "swimming pool",
          "train station", "town hall", "fire brigade", "hospital"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]


def prose(seed: int, sentences: int) -> str:
    """Council-minutes English: the reference and the in-domain documents, never the same."""
    rng = random.Random(seed)
    return " ".join(
        f"On {rng.choice(DAYS)} the council discussed the {rng.choice(TOPICS)}, and after a "
        f"long debate the members agreed to spend {rng.randint(2, 90)} thousand on the "
        f"{rng.choice(TOPICS)} next year, while residents asked about the {rng.choice(TOPICS)}."
        for _ in range(sentences))


GIBBERISH = "".join(random.Random(7).choice("qxzjkvwy bcdfgh") for _ in range(400))
NAVIGATION = "Home | Login | Register | Cart (0) | FAQ | EUR | USD | GBP | " * 6



@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(write_jsonl(folder / "c.jsonl", [prose(1, 20), GIBBERISH, NAVIGATION]),
                    folder / "t.json", 300)
    return folder / "t.json"


def test_the_model_finds_in_domain_text_likely_and_junk_unlikely() -> None:
    lm = CharModel(prose(0, 150))
    held_out = lm.perplexity(prose(99, 5))
    assert held_out < 10 < 50 < lm.perplexity(NAVIGATION) < lm.perplexity(GIBBERISH)
    assert lm.perplexity(prose(99, 5).upper()) == held_out  # scored after normalisation


def test_prepare_drops_what_the_reference_finds_unlikely(tokenizer: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    reference = tmp_path / "reference.txt"
    reference.write_text(prose(0, 150))
    data = write_jsonl(tmp_path / "in" / "a.jsonl",
                       [prose(10, 3), GIBBERISH, prose(11, 4), NAVIGATION])
    prefix = tmp_path / "ds"
    assert main(["--input", str(data), "--tokenizer", str(tokenizer), "--workers", "1",
                 "--output-prefix", str(prefix), "--perplexity-reference", str(reference),
                 "--max-perplexity", "30", "--keep-shards"]) == 0
    stats = json.loads(Path(f"{prefix}.stats.json").read_text())
    stage = next(s for s in stats["stages"] if s["stage"] == "perplexity")
    assert (stage["in"], stage["out"], stage["retention_pct"]) == (4, 2, 50.0)
    assert stats["dropped"] == {"perplexity": 2} and stats["total"]["kept"] == 2
    capsys.readouterr()
    perplexity.main(["--reference", str(reference), str(data)])  # to choose the threshold
    out = capsys.readouterr().out
    assert "p50" in out and "highest: line 2 (" in out  # the gibberish
    reference.write_text(prose(0, 150).replace("council", "cauncil"))  # replaced in place
    again = prepare([data], tokenizer, prefix, Options(perplexity_reference=str(reference),
                                                       max_perplexity=30.0))
    assert not again["files"][0].get("skipped")  # scores of another model: the shard is stale
    capsys.readouterr()
    assert main(["--input", str(data), "--tokenizer", str(tokenizer), "--output-prefix",
                 str(tmp_path / "x"), "--max-perplexity", "30"]) == 1
    assert "--perplexity-reference" in capsys.readouterr().err

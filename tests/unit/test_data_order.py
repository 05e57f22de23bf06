"""Sample i of the training data is the same whatever train.steps is, also for a source that a
run reads more than once (#25: an extended run must not see other data at the steps it had)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest
import torch.distributed as dist

from megatron_ext.data import build_train_dataset
from tests.conftest import make_config
from tools.demo_data import train_tokenizer, write_indexed_dataset

SEQ, GBS = 32, 4


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tokenizer, a small source (a few dozen samples) and a larger one."""
    folder = tmp_path_factory.mktemp("order")
    words = [f"word{i} token{i % 7} piece{i % 13}" for i in range(400)]
    small, large = folder / "small.jsonl", folder / "large.jsonl"
    small.write_text("".join(json.dumps({"text": " ".join(words[i:i + 12])}) + "\n"
                             for i in range(0, 120, 12)))
    large.write_text("".join(json.dumps({"text": " ".join(words[i:i + 30])}) + "\n"
                             for i in range(0, 400, 10)))
    train_tokenizer(large, folder / "tokenizer.json", vocab_size=300)
    for corpus in (small, large):
        write_indexed_dataset(corpus, folder / "tokenizer.json", folder / corpus.stem)
    return folder / "tokenizer.json", folder / "small", folder / "large"


@pytest.fixture(scope="module", autouse=True)
def one_rank_group(tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _dataset(tokenizer: Path, prefixes: list[Path], steps: int, cache: Path):
    blend = ",".join(f"{{path:{p},weight:1.0}}" for p in prefixes)
    cfg = make_config("data=demo", "data.prepare_demo=false", f"data.tokenizer={tokenizer}",
                      f"data.sources=[{blend}]", "data.split='100,0,0'",
                      f"train.steps={steps}", f"train.seq_length={SEQ}",
                      f"train.global_batch_size={GBS}", "train.micro_batch_size=1",
                      "model.vocab_size=512")
    return build_train_dataset(cfg, str(cache))


def _tokens(dataset, count: int) -> list[list[int]]:
    return [numpy.asarray(dataset[i]["tokens"]).tolist() for i in range(count)]


@pytest.mark.parametrize("blended", [False, True], ids=["one-source", "blend"])
def test_more_steps_keep_every_planned_sample(sources, tmp_path: Path, blended: bool) -> None:
    tokenizer, small, large = sources
    prefixes = [small, large] if blended else [small]
    short = _dataset(tokenizer, prefixes, steps=30, cache=tmp_path)
    longer = _dataset(tokenizer, prefixes, steps=90, cache=tmp_path)  # the same run, extended
    epoch = len(short.datasets[0].epoch if blended else short.epoch)
    assert 30 * GBS > 2 * epoch  # the small source is read several times within the short run
    assert _tokens(longer, 30 * GBS) == _tokens(short, 30 * GBS)


def test_each_pass_is_the_epoch_in_another_order(sources, tmp_path: Path) -> None:
    tokenizer, small, _ = sources
    dataset = _dataset(tokenizer, [small], steps=30, cache=tmp_path)
    n = len(dataset.epoch)
    first, second = _tokens(dataset, 2 * n)[:n], _tokens(dataset, 2 * n)[n:]
    assert sorted(first) == sorted(second) and first != second

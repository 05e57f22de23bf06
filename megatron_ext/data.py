"""Training batches from megatron-core's GPT datasets (indexed and blended, or mock).

Sample order is a pure function of ``consumed_samples``: global batch ``b`` is samples
``[b*gbs, (b+1)*gbs)`` of the blended dataset, split the same way on every layout. That is
what makes TP/PP/DP runs comparable and a resumed run see exactly the data it would have,
also at another ``train.global_batch_size`` (the checkpoint keeps ``consumed_samples``, as
Megatron's ``consumed_train_samples``). Each step's ``data_digest`` (metrics.jsonl) fingerprints
which samples it read, in which places, so two runs can be checked to read the same data.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union
import zlib

import numpy
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer as MegatronTokenizer

from launch.schema import DataConfig, RunConfig
from launch import tokenizer as tokenizer_rule
from megatron_ext.passes import SourcePasses
from megatron_ext.sft_data import SFTDataset


class HFTokenizer(MegatronTokenizer):
    """A local Hugging Face tokenizer (``tokenizer.json`` or its directory) in megatron's
    tokenizer interface; the end-of-document token is found by ``launch.tokenizer``'s rule
    (``tokenizer_config.json``'s eos_token, else ``<|endoftext|>``, Llama 3's
    ``<|end_of_text|>``...), so training splits documents where the data has them."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._tokenizer, self._eod = tokenizer_rule.load_tokenizer(Path(path))

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def detokenize(self, ids: Any) -> str:
        return self._tokenizer.decode(list(ids))

    @property
    def vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab()

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def eod(self) -> int:
        return self._eod


class _SyntheticTokenizer(MegatronTokenizer):
    """What MockGPTDataset needs to know about a vocabulary: its size and end-of-document id."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__("synthetic")
        self._vocab_size = vocab_size

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError("synthetic data has no text")

    @property
    def vocab(self) -> dict[str, int]:
        return {}

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {}

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._vocab_size - 1


def load_tokenizer(data: DataConfig, model_vocab_size: int) -> MegatronTokenizer:
    if data.kind == "synthetic":
        return _SyntheticTokenizer(model_vocab_size)
    tokenizer = HFTokenizer(data.tokenizer)
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"tokenizer {data.tokenizer} has {tokenizer.vocab_size} tokens but "
                         f"model.vocab_size={model_vocab_size}; raise model.vocab_size")
    return tokenizer


def dataset_config(cfg: RunConfig, cache_dir: str, blend: Optional[tuple]) -> GPTDatasetConfig:
    """Megatron's dataset config for this run (training and validation read alike)."""
    return GPTDatasetConfig(
        random_seed=cfg.train.seed, sequence_length=cfg.train.seq_length, blend=blend,
        split=cfg.data.split, path_to_cache=cache_dir,
        tokenizer=load_tokenizer(cfg.data, cfg.model.vocab_size),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False)


def sft_dataset(cfg: RunConfig, path: str, part: int, split: str = "") -> SFTDataset:
    """One part of ``split`` (``data.split``) of a prepared chat dataset, padded with
    end-of-document."""
    return SFTDataset(path, seq_length=cfg.train.seq_length, packing=cfg.data.packing,
                      pad_id=load_tokenizer(cfg.data, cfg.model.vocab_size).eod,
                      seed=cfg.train.seed, split=split or cfg.data.split, part=part)


def _one_epoch(cfg: RunConfig, cache_dir: str, path: Optional[str]) -> GPTDataset:
    """One epoch of one source's training split (megatron's order; built by rank 0 first)."""
    if cfg.data.kind == "sft":
        return sft_dataset(cfg, path, part=0)
    dataset_cls = GPTDataset if path is not None else MockGPTDataset
    blend = ([path], None) if path is not None else None
    return BlendedMegatronDatasetBuilder(dataset_cls, [None, None, None], lambda: True,
                                         dataset_config(cfg, cache_dir, blend)).build()[0]


def samples_to_read(consumed: int, start_step: int, steps: int, global_batch_size: int) -> int:
    """The samples a run has read after its last step: what its checkpoint consumed (at the
    batch size of the run that saved it), then ``global_batch_size`` per remaining step."""
    return consumed + max(steps - start_step, 0) * global_batch_size


def build_train_dataset(cfg: RunConfig, cache_dir: str, num_samples: Optional[int] = None
                        ) -> Union[SourcePasses, BlendedDataset]:
    """``num_samples`` samples (default: ``train.steps`` global batches); sample ``i`` is the
    same whatever the size is (``megatron_ext.passes``; megatron's greedy blending index is
    prefix-stable), so an extended run, or one resumed at another batch size, keeps its order."""
    data, train = cfg.data, cfg.train
    if num_samples is None:
        num_samples = train.steps * train.global_batch_size
    paths = [s.path for s in data.sources] if data.kind in ("indexed", "sft") else [None]
    sources = [SourcePasses.covering(_one_epoch(cfg, cache_dir, path), train.seed, num_samples)
               for path in paths]
    if len(sources) == 1:
        return sources[0]
    weights = [s.weight for s in data.sources]
    weights = [w / sum(weights) for w in weights]
    return BlendedMegatronDatasetBuilder.build_generic_dataset(
        BlendedDataset, lambda: True, True, sources, weights, num_samples,
        dataset_config(cfg, cache_dir, None))


@dataclass(frozen=True)
class BatchPlan:
    """Which samples a data-parallel rank reads for each micro-batch of a global batch."""

    global_batch_size: int
    micro_batch_size: int
    dp_size: int
    dp_rank: int

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def sample_indices(self, consumed_samples: int, microbatch: int) -> list[int]:
        """Megatron's pretraining sampler order: each micro-batch slot is split across DP."""
        start = (consumed_samples + microbatch * self.micro_batch_size * self.dp_size
                 + self.dp_rank * self.micro_batch_size)
        return list(range(start, start + self.micro_batch_size))


def _stack(samples: list[dict]) -> dict[str, torch.Tensor]:
    keys = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")
    return {key: torch.stack([torch.as_tensor(numpy.asarray(s[key])) for s in samples])
            for key in keys if key in samples[0]}


def sample_digest(position: int, tokens: Any) -> int:
    """CRC-32 of a sample's place in the data order and its tokens (< 2**32): summed over a
    global batch (exact in float64 up to 2**21 samples), equal sums mean the same samples in
    the same places, short of a collision."""
    return zlib.crc32(numpy.asarray(tokens, dtype=numpy.int64).tobytes(),
                      zlib.crc32(numpy.int64(position).tobytes()))


class GlobalBatch:
    """This rank's micro-batches of the global batch after ``consumed_samples`` samples, as
    tensors (with the packed sequences' attention mask where ``data.kind=sft`` packs them), and
    the digest of the samples it yielded. Only the rank that reads for its data-parallel
    replica (``counts``: first stage, TP and CP rank 0) counts them, so the digests summed over
    all ranks are the whole global batch's (``sample_digest``)."""

    def __init__(self, dataset: GPTDataset, plan: BatchPlan, consumed_samples: int, *,
                 counts: bool) -> None:
        self._dataset, self._plan, self._consumed = dataset, plan, consumed_samples
        self._counts, self._digest = counts, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(self._plan.num_microbatches):
            indices = self._plan.sample_indices(self._consumed, i)
            samples = [self._dataset[j] for j in indices]
            if self._counts:
                self._digest += sum(sample_digest(j, s["tokens"]) for j, s in zip(indices, samples))
            yield _stack(samples)

    def digest(self) -> int:
        """This rank's share of the global batch's digest, once the schedule read the batch."""
        return self._digest

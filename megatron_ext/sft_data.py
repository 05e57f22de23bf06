"""Fine-tuning samples: conversations with a loss mask, packed into training sequences.

``tools.prepare_data --format chat`` writes each conversation as one document of
``<prefix>`` and its loss mask (1 on the answers) as the same document of
``<prefix>_loss_mask``. Conversations are split by ``data.split`` (contiguous, as megatron
splits documents), shuffled by the seed and laid next-fit into sequences of
``seq_length + 1`` tokens; padding fills the rest, never in the loss.

With ``data.packing`` several conversations share a sequence and none sees another: the sample
carries a block-diagonal causal ``attention_mask`` (megatron's convention, True = masked) that
the local layer spec's attention applies, and the position ids restart per conversation. RoPE
(megatron's GPTModel rotates by offset in the sequence, not by ``position_ids``) depends on the
distance between tokens only, so within a block it scores exactly as an unpacked conversation.
No label crosses from one conversation into the next. Without packing each sequence holds one
conversation, padded, under the plain causal mask.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from types import SimpleNamespace

import numpy
import torch

from launch.schema import SFT_MASK_SUFFIX


def pack(lengths: Sequence[int], capacity: int, packing: bool) -> list[list[int]]:
    """Positions into ``lengths`` per sequence, in order: next-fit, or one each unpacked."""
    if not packing:
        return [[i] for i in range(len(lengths))]
    out: list[list[int]] = []
    used = capacity
    for i, length in enumerate(lengths):
        if used + length > capacity:
            out.append([])
            used = 0
        out[-1].append(i)
        used += length
    return out


def sample(conversations: list[tuple[numpy.ndarray, numpy.ndarray]], seq_length: int,
           pad_id: int, packing: bool) -> dict[str, numpy.ndarray]:
    """One training sequence from its conversations' (ids, mask) pairs (pure)."""
    size = seq_length + 1
    ids = numpy.full(size, pad_id, numpy.int64)
    mask = numpy.zeros(size, numpy.float32)
    segment = numpy.full(size, -1, numpy.int64)
    positions = numpy.arange(size, dtype=numpy.int64)
    start = 0
    for n, (tokens, answer) in enumerate(conversations):
        end = start + len(tokens)
        ids[start:end], mask[start:end], segment[start:end] = tokens, answer, n
        positions[start:end] = numpy.arange(len(tokens))
        start = end
    assert start <= size, f"{start} tokens packed into a sequence of {size}"
    out = {"tokens": ids[:-1], "labels": ids[1:], "position_ids": positions[:-1],
           "loss_mask": mask[1:] * (segment[1:] == segment[:-1])}
    if packing:
        seg = segment[:-1]
        causal = numpy.tril(numpy.ones((seq_length, seq_length), dtype=bool))
        out["attention_mask"] = ~(causal & (seg[:, None] == seg[None, :]))[None]
    return out


def split_range(count: int, split: str, part: int) -> range:
    """Documents of ``part`` (0 train, 1 validation, 2 test) of ``data.split``, contiguous."""
    weights = [float(w) for w in split.split(",")]
    bounds = numpy.round(numpy.cumsum([0.0] + weights) / sum(weights) * count).astype(int)
    return range(int(bounds[part]), int(bounds[part + 1]))


class SFTDataset(torch.utils.data.Dataset):
    """The packed sequences of one part of a prepared chat dataset (one epoch)."""

    def __init__(self, prefix: str, *, seq_length: int, packing: bool, pad_id: int, seed: int,
                 split: str, part: int) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self._tokens, self._mask = IndexedDataset(prefix), IndexedDataset(prefix + SFT_MASK_SUFFIX)
        lengths = self._tokens.sequence_lengths
        if len(self._mask) != len(self._tokens):
            raise ValueError(f"{prefix}{SFT_MASK_SUFFIX} has {len(self._mask)} documents, "
                             f"{prefix} {len(self._tokens)}; rerun tools.prepare_data --format chat")
        docs = numpy.random.default_rng(seed).permutation(
            numpy.asarray(split_range(len(lengths), split, part)))
        too_long = [int(d) for d in docs if lengths[d] > seq_length + 1]
        if too_long:
            raise ValueError(f"{prefix}: {len(too_long)} conversations are longer than "
                             f"train.seq_length + 1 = {seq_length + 1} tokens; rerun "
                             f"tools.prepare_data --format chat --max-tokens {seq_length + 1}")
        self._packs = [[int(docs[i]) for i in p]
                       for p in pack([int(lengths[d]) for d in docs], seq_length + 1, packing)]
        self._seq_length, self._packing, self._pad_id = seq_length, packing, pad_id
        self.dataset_path = prefix
        self.index_split = SimpleNamespace(name=("train", "valid", "test")[part])
        self.unique_identifiers = OrderedDict(class_name=type(self).__name__, prefix=prefix,
                                              seq_length=seq_length, packing=packing, seed=seed,
                                              split=split, part=part)

    def __len__(self) -> int:
        return len(self._packs)

    def conversations(self, idx: int) -> list[int]:
        """Which documents sequence ``idx`` holds."""
        return self._packs[idx]

    def __getitem__(self, idx: int) -> dict[str, numpy.ndarray]:
        pairs = [(numpy.asarray(self._tokens[d]), numpy.asarray(self._mask[d]))
                 for d in self._packs[idx]]
        return sample(pairs, self._seq_length, self._pad_id, self._packing)

"""A data source read pass after pass, each pass's order fixed by the seed and the pass alone.

Megatron's ``GPTDataset`` sizes its shuffle by the number of samples asked for: a source read
more than once is shuffled over all its epochs together, so a run extended with more
``train.steps`` (common in continued pre-training) would see other data at every step it had
already planned. Here each source is built for exactly one epoch (megatron's own order is pass
0) and pass ``p >= 1`` is a permutation of that epoch drawn from ``(seed, p)``: asking for more
steps appends passes and changes no sample that was already in the order.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Optional

import numpy
import torch


class SourcePasses(torch.utils.data.Dataset):
    """``passes`` passes over one epoch of a source; only the length depends on ``passes``."""

    def __init__(self, epoch: Any, seed: int, passes: int) -> None:
        if len(epoch) == 0:
            raise ValueError(f"{epoch.dataset_path or 'the synthetic data'} has no "
                             f"{epoch.index_split.name} samples of the configured sequence length")
        self.epoch = epoch
        self.seed = seed
        self.passes = passes
        self.index_split = epoch.index_split  # what megatron's BlendedDataset reads
        self.unique_identifiers = OrderedDict(class_name=type(self).__name__, seed=seed,
                                              epoch=epoch.unique_identifiers)
        self._pass: Optional[int] = None
        self._order: Optional[numpy.ndarray] = None

    @classmethod
    def covering(cls, epoch: Any, seed: int, num_samples: int) -> "SourcePasses":
        """Enough passes that any blend of ``num_samples`` draws fewer from this source (megatron's
        greedy blending never draws more than one sample ahead of the source's share)."""
        return cls(epoch, seed, passes=max(1, math.ceil((num_samples + 1) / max(len(epoch), 1))))

    def __len__(self) -> int:
        return len(self.epoch) * self.passes

    def __getitem__(self, idx: int) -> dict:
        pass_number, offset = divmod(int(idx), len(self.epoch))
        if not 0 <= pass_number < self.passes:
            raise IndexError(f"sample {idx} is past {self.passes} passes of {len(self.epoch)}")
        if pass_number == 0:
            return self.epoch[offset]
        return self.epoch[int(self._pass_order(pass_number)[offset])]

    def _pass_order(self, pass_number: int) -> numpy.ndarray:
        """The permutation of pass ``pass_number``; one pass is kept, as reads go in order."""
        if self._pass != pass_number:
            rng = numpy.random.default_rng([self.seed, pass_number])
            self._order, self._pass = rng.permutation(len(self.epoch)), pass_number
        return self._order

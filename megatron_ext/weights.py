"""Where pretrained weights come from, as megatron's global tensors: ``open_weights``.

Three sources: a Hugging Face Llama directory and a converted one (``megatron_ext.hf_llama``),
and a training run's checkpoint (this module): its ``checkpoint.dir`` (the newest committed
step) or one committed ``step_<N>`` folder. megatron's torch_dist format stores every parameter
as one global tensor (layers stacked on axis 0, the vocabulary padded for TP), whatever
TP/PP/VPP/DP layout wrote it, so one process reads any layout back, one block at a time and
never the optimizer state. Uncommitted folders are never read (the rules resume follows).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
import yaml
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
    CachedMetadataFileSystemReader,
)
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from launch import ckpt_commit as commit
from megatron_ext.ckpt_files import listing, verify, verify_shards
from megatron_ext.hf_llama import (
    ARCHITECTURE,
    LAYER_PREFIX,
    META_FILE,
    PADDED_ROWS,
    Converted,
    HFLlama,
    WeightSource,
)


ShardCheck = Callable[[Path], list[str]]
"""Re-hashes a checkpoint folder's shards against its manifest; the problems found."""


def rehash_here(folder: Path) -> list[str]:
    """Every shard re-hashed by this one process (the exporter)."""
    return verify_shards(folder, part=0, parts=1)


def open_weights(path: str | Path, *,
                 shard_check: Optional[ShardCheck] = rehash_here) -> WeightSource:
    """The weights at ``path``: a converted or Hugging Face directory, else a training run's
    checkpoint, whose shards ``shard_check`` re-hashes first (a run starting from it shares
    the work over its ranks: ``checkpoint.shard_problems``; None: sizes and metadata only)."""
    folder = Path(path)
    if (folder / META_FILE).is_file():
        return Converted(folder)
    if (folder / "config.json").is_file():
        return HFLlama(folder)
    return TrainingCheckpoint(committed_checkpoint(folder, shard_check=shard_check))


class _BlockPlanner(DefaultLoadPlanner):
    """Reads one block of a stored global tensor; torch's default planner reads it whole."""

    def __init__(self, offsets: tuple[int, ...]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._offsets = offsets

    def create_local_plan(self) -> LoadPlan:
        (key, block), = self.state_dict.items()
        wanted = ChunkStorageMetadata(offsets=torch.Size(self._offsets), sizes=block.shape)
        return LoadPlan(create_read_items_for_chunk_list(
            key, self.metadata.state_dict_metadata[key], [wanted]))

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]  # the block itself, not a shard of a larger tensor


class TrainingCheckpoint:
    """The model weights of one committed checkpoint of a training run; only the block asked
    for is read: one layer of one weight at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        config = yaml.safe_load((folder / "config.yaml").read_text())
        self.model: dict[str, Any] = {name: config["model"][name] for name in ARCHITECTURE}
        self.tokenizer: str = config["data"]["tokenizer"]
        self._reader = CachedMetadataFileSystemReader(str(folder))
        self._stored = self._reader.read_metadata().state_dict_metadata

    def rows(self, key: str) -> int:
        """Rows of a stored tensor as saved: for the embedding, the padded vocabulary."""
        return int(self._stored[key].size[0])

    def tensor(self, key: str) -> torch.Tensor:
        stored, layer = key, ()
        if key.startswith(LAYER_PREFIX):  # decoder.layers.<i>.<rest>: block i of the stack
            index, rest = key[len(LAYER_PREFIX):].split(".", 1)
            stored, layer = LAYER_PREFIX + rest, (int(index),)
        meta = self._stored.get(stored)
        if not isinstance(meta, TensorStorageMetadata):
            raise KeyError(f"{self.folder}: tensor {stored!r} is missing from the checkpoint")
        shape = list(meta.size[len(layer):])
        if key in PADDED_ROWS:
            shape[0] = self.model["vocab_size"]  # the rows megatron padded for TP are dropped
        block = torch.empty([1] * len(layer) + shape, dtype=meta.properties.dtype)
        dcp.load({stored: block}, storage_reader=self._reader, no_dist=True,
                 planner=_BlockPlanner((*layer, *[0] * len(shape))))
        return block.reshape(shape)


def committed_checkpoint(path: Path, *,
                         shard_check: Optional[ShardCheck] = rehash_here) -> Path:
    """``path`` itself if it is a committed ``step_<N>``, else the newest committed one under
    it (a run's ``checkpoint.dir``); verified against its manifest (sizes and metadata, then
    the shards' SHA-256 by ``shard_check`` unless it is None).

    Uncommitted folders (``.tmp``, or no marker: a save killed or still being written) are
    never read, the same rules ``Checkpointer.load_latest`` resumes by.
    """
    if commit.incomplete({path.name: (path / commit.MARKER).is_file()}):
        raise ValueError(f"{path} is not a committed checkpoint (no {commit.MARKER}: its save "
                         "was interrupted or is still running); use a committed step")
    if commit.parse_step(path.name) is not None:
        chosen = path
    else:
        found = listing(path)
        newest = commit.load_order(found)
        if not newest:
            skipped = f" (uncommitted, skipped: {', '.join(commit.incomplete(found))})" \
                if commit.incomplete(found) else ""
            raise ValueError(f"{path} holds no committed training checkpoint (step_<N>/ with "
                             f"{commit.MARKER}){skipped}, no converted checkpoint ({META_FILE}) "
                             "and no Hugging Face model (config.json)")
        chosen = path / commit.step_dir(newest[0])
    problems = verify(chosen) or (shard_check(chosen) if shard_check else [])
    if problems:
        raise ValueError(f"{chosen} does not match its manifest: {'; '.join(problems)}; use "
                         "an older committed step_<N> folder instead")
    return chosen

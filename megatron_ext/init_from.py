"""Start continued pre-training from pretrained weights (``train.init_from``), for any layout.

Unlike resuming, only the model weights are taken: the optimizer and the learning-rate
schedule start fresh. Each rank reads the full tensor of every shard it holds and keeps its
slice, located by the ``ShardedTensor`` global offsets, exactly as
``model.init_layout_independent`` places its draws; so TP, PP, VPP and DP all start from
the same model. One full matrix is in memory at a time.
"""
from __future__ import annotations

from pathlib import Path

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.models.gpt import GPTModel

from launch.planning.flops import padded_vocab_size
from launch.schema import ModelConfig
from launch import ckpt_commit as commit
from megatron_ext.checkpoint import shard_problems
from megatron_ext.ckpt_files import listing
from megatron_ext.hf_llama import PADDED_ROWS, WeightSource, model_problems
from megatron_ext.model import weight_shards
from megatron_ext.weights import TrainingCheckpoint, open_weights


def has_checkpoint(checkpoint_dir: str) -> bool:
    """A committed checkpoint exists, so the run resumes from it instead of ``init_from``."""
    return bool(commit.committed_steps(listing(Path(checkpoint_dir))))


def vocab_rows(checkpoint_dir: str, model: ModelConfig, tp: int) -> int:
    """Embedding rows to build: those of the newest committed checkpoint, which the run resumes
    from, else megatron's padding for ``tp``.

    A resume keeps the padding it was saved with: the padding rows' logits take part in
    megatron's softmax, so a TP that pads differently (vocab 600: 640 rows at TP=1, 768 at TP=2)
    adds logits the run never had. Measured (tests/integration/test_checkpoint.py): a tiny model
    saved at TP=1 step 3 and resumed at TP=2 with 768 rows had loss 5.756 at step 4 instead of
    the TP=1 run's 5.578; with the saved 640 rows, equal to 1e-4. Every rank reads the same small
    metadata file; one that cannot be read is skipped, as the resume falls back past it.
    """
    for step in commit.load_order(listing(Path(checkpoint_dir))):
        saved = Path(checkpoint_dir) / commit.step_dir(step)
        try:
            rows = TrainingCheckpoint(saved).rows(PADDED_ROWS[0])
        except Exception:  # corrupt metadata: Checkpointer.load_latest reports and skips it
            continue
        return _divided_rows(rows, tp, saved, model)
    return padded_vocab_size(model, tp)


def _divided_rows(rows: int, tp: int, saved: Path, model: ModelConfig) -> int:
    """``rows``, which megatron's vocab-parallel embedding and output layer split ``tp`` ways."""
    if rows % tp:
        raise ValueError(f"parallel.tp={tp} must divide the {rows} embedding rows of {saved} "
                         f"(model.vocab_size={model.vocab_size} padded as it was saved), "
                         "which a resume keeps; choose a parallel.tp that divides them")
    return rows


def storage_key(shard: ShardedTensor) -> str:
    """``decoder.layers.<rest>`` with the shard's global layer index put back in."""
    if shard.prepend_axis_num == 0:
        return shard.key
    assert shard.prepend_axis_num == 1 and shard.key.startswith("decoder.layers."), shard.key
    return f"decoder.layers.{shard.global_offset[0]}.{shard.key[len('decoder.layers.'):]}"


def _pad_rows(key: str, full: torch.Tensor, rows: int) -> torch.Tensor:
    """Megatron pads the vocabulary to a multiple of 128*TP; the padding rows start at zero."""
    if key.endswith(PADDED_ROWS) and full.shape[0] < rows:
        return torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
    return full


@torch.no_grad()
def copy_shard(shard: ShardedTensor, full: torch.Tensor) -> None:
    """Copy this rank's slice of ``full`` (the tensor without the layer axis) into the shard."""
    global_shape = shard.global_shape[shard.prepend_axis_num:]
    full = _pad_rows(shard.key, full, global_shape[0])
    if tuple(full.shape) != tuple(global_shape):
        raise ValueError(f"{shard.key}: pretrained shape {tuple(full.shape)}, the model "
                         f"expects {tuple(global_shape)}")
    offsets = shard.global_offset[shard.prepend_axis_num:]
    index = tuple(slice(o, o + n) for o, n in zip(offsets, shard.local_shape))
    shard.data.copy_(full[index].to(shard.data.dtype))


def load_pretrained(chunks: list[GPTModel], path: str, model_cfg: ModelConfig, *,
                    verify: str = "checksums") -> WeightSource:
    """Overwrite every weight of this rank's chunks with the pretrained model at ``path``.

    ``path`` is a Hugging Face Llama directory, one converted by ``tools.convert_hf``, or a
    training run's checkpoint (its ``checkpoint.dir`` or a committed ``step_<N>``). A
    checkpoint is checked as resume checks one (``checkpoint.verify``): with ``checksums`` the
    ranks share the re-hashing, so a silently changed shard stops the run before any step.
    Collective: every rank calls it.
    """
    try:
        source = open_weights(path, shard_check=shard_problems if verify == "checksums" else None)
    except ValueError as exc:
        raise ValueError(f"train.init_from={path}: {exc}") from exc
    problems = model_problems(source.model, model_cfg)
    if problems:
        raise ValueError(f"train.init_from={path}: the model config does not match:\n  "
                         + "\n  ".join(problems))
    for chunk in chunks:
        shards: dict[str, list[ShardedTensor]] = {}
        for shard in weight_shards(chunk):
            shards.setdefault(storage_key(shard), []).append(shard)
        for key, group in shards.items():  # SwiGLU's fc1 is two shards of one tensor
            full = source.tensor(key)
            for shard in group:
                copy_shard(shard, full)
    return source

"""The parallel layout: what the user asks for (``ParallelConfig``), the complete ``Layout`` the
ranks build, and how megatron-core splits the layers over the pipeline stages.

Stdlib only (part of the schema layer, re-exported by ``launch.schema``). Pipeline stages may
hold different numbers of layers, as megatron-core allows: ``num_layers_in_first_pipeline_stage``
/ ``num_layers_in_last_pipeline_stage`` (the rest split evenly over the middle stages), or
``account_for_embedding_in_pipeline_split`` / ``account_for_loss_in_pipeline_split`` (the
embedding and the output layer with the loss each count as one layer of the split). That is how
Llama 3.1 405B's 126 layers run on PP=8: (126 + 2) / 8 = 16 per stage, 15 real on the first
and the last.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from launch.problems import positive_problem


@dataclass
class ParallelConfig:
    """How the model is split. ``auto`` asks the planner (``launch.planning.planner``) for the
    layout."""

    name: str = "dp"
    auto: bool = False
    tp: int = 1
    """Tensor parallel size; kept within one node."""
    pp: int = 1
    """Pipeline parallel size."""
    vpp: int = 1
    """Virtual pipeline stages per rank (interleaved 1F1B); 1 means not interleaved."""
    cp: int = 1
    """Context parallel size (splits the sequence in attention)."""
    dp: Optional[int] = None
    """Data parallel size; None derives it as world_size / (tp * pp * cp)."""
    sp: bool = False
    """Sequence parallelism for the non-attention parts; needs tp > 1."""
    overlap_grad_reduce: bool = False
    """Reduce each gradient bucket over DP as soon as backward has filled it, hiding the
    communication behind the rest of backward (megatron DDP's ``overlap_grad_reduce``)."""
    overlap_param_gather: bool = False
    """Distributed optimizer: all-gather the updated parameter shards bucket by bucket during
    the next forward instead of right after the step; needs overlap_grad_reduce=true and
    optimizer.distributed=true (megatron's ``overlap_param_gather``)."""
    num_layers_in_first_pipeline_stage: Optional[int] = None
    """Layers of the first pipeline stage (None: an even share); the middle stages split the
    rest evenly. Divisible by vpp. Not with the account_for_* options."""
    num_layers_in_last_pipeline_stage: Optional[int] = None
    """Layers of the last pipeline stage (None: an even share), as the first's."""
    account_for_embedding_in_pipeline_split: bool = False
    """Count the embedding as one layer of the split: (num_layers + 1 [+ 1]) / pp per stage,
    one real layer fewer on the first."""
    account_for_loss_in_pipeline_split: bool = False
    """Count the output layer and loss as one layer of the split: one real layer fewer on the
    last stage."""

    def problems(self) -> list[str]:
        out: list[str] = []
        for name in ("tp", "pp", "vpp", "cp"):
            out += positive_problem(f"parallel.{name}", getattr(self, name))
        if self.dp is not None:
            out += positive_problem("parallel.dp", self.dp)
        if self.sp and self.tp == 1:
            out.append("parallel.sp=true needs parallel.tp > 1 (sequence parallelism splits "
                       "along the tensor-parallel group)")
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            out.append("parallel.overlap_param_gather=true needs parallel.overlap_grad_reduce="
                       "true (megatron gathers parameters in the buckets the reduction fills)")
        if self.vpp > 1 and self.pp == 1:
            out.append(f"parallel.vpp={self.vpp} needs parallel.pp > 1 (virtual stages "
                       "interleave a real pipeline)")
        return out


@dataclass(frozen=True)
class Layout:
    """A complete parallel layout; tp * pp * cp * dp == world_size. The last four fields are
    megatron's uneven pipeline split (``ParallelConfig``); their defaults split evenly."""

    tp: int
    pp: int
    cp: int
    dp: int
    vpp: int = 1
    sp: bool = False
    first_stage_layers: Optional[int] = None
    last_stage_layers: Optional[int] = None
    embedding_in_split: bool = False
    loss_in_split: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def even(self) -> bool:
        return not (self.first_stage_layers or self.last_stage_layers
                    or self.embedding_in_split or self.loss_in_split)

    def describe(self) -> str:
        text = (f"TP={self.tp} PP={self.pp} VPP={self.vpp} CP={self.cp} DP={self.dp} "
                f"SP={'on' if self.sp else 'off'}")
        if self.first_stage_layers or self.last_stage_layers:
            text += f" first/last stage layers={self.first_stage_layers}/{self.last_stage_layers}"
        if self.embedding_in_split or self.loss_in_split:
            counted = [n for n, on in (("embedding", self.embedding_in_split),
                                       ("loss", self.loss_in_split)) if on]
            text += f" split counts {'+'.join(counted)}"
        return text


def layout_from(p: ParallelConfig, dp: int) -> Layout:
    """``p``'s layout with ``dp`` data-parallel replicas."""
    return Layout(tp=p.tp, pp=p.pp, cp=p.cp, dp=dp, vpp=p.vpp, sp=p.sp,
                  first_stage_layers=p.num_layers_in_first_pipeline_stage,
                  last_stage_layers=p.num_layers_in_last_pipeline_stage,
                  embedding_in_split=p.account_for_embedding_in_pipeline_split,
                  loss_in_split=p.account_for_loss_in_pipeline_split)


def split_problems(num_layers: int, layout: Layout) -> list[str]:
    """Why megatron-core cannot split ``num_layers`` this way (TransformerConfig's uneven-PP
    checks), in the config's field names; empty when ``stage_layers`` applies."""
    p, v, first, last = layout.pp, layout.vpp, layout.first_stage_layers, layout.last_stage_layers
    pre = "parallel.num_layers_in_"
    if (first or last) and (layout.embedding_in_split or layout.loss_in_split):
        return [f"{pre}first/last_pipeline_stage cannot be combined with parallel.account_for_"
                "embedding/loss_in_pipeline_split (megatron-core takes one or the other)"]
    out = []
    for name, value in (("first", first), ("last", last)):
        if value is not None and (value <= 0 or value % v or p == 1):
            out.append(f"{pre}{name}_pipeline_stage={value} must be > 0, divisible by "
                       f"parallel.vpp={v}, with parallel.pp > 1")
    if out:
        return out
    if layout.even:
        return [] if num_layers % (p * v) == 0 else [
            f"model.num_layers={num_layers} must be divisible by parallel.pp*parallel.vpp = "
            f"{p * v} (or split unevenly: parallel.num_layers_in_first/last_pipeline_stage or "
            "parallel.account_for_embedding/loss_in_pipeline_split)"]
    counts = _split(num_layers, layout)
    if counts is None or min(min(chunks) for chunks in counts) < 1:
        return [f"model.num_layers={num_layers} cannot be split this way over parallel.pp={p} "
                f"x parallel.vpp={v}: {layout.describe()} leaves a stage an uneven or empty "
                "share (every stage's layers, counted as megatron counts them, must divide by "
                "vpp and the middle stages' evenly)"]
    return []


def _split(num_layers: int, layout: Layout) -> Optional[list[list[int]]]:
    """Real layers per pipeline rank and virtual chunk, or None if they do not divide."""
    p, v = layout.pp, layout.vpp
    if layout.embedding_in_split or layout.loss_in_split:
        total = num_layers + layout.embedding_in_split + layout.loss_in_split
        if total % (p * v):
            return None
        out = [[total // (p * v)] * v for _ in range(p)]
        out[0][0] -= int(layout.embedding_in_split)
        out[-1][-1] -= int(layout.loss_in_split)
        return out
    ends = [n for n in (layout.first_stage_layers, layout.last_stage_layers) if n]
    middle_stages, rest = p - len(ends), num_layers - sum(ends)
    if (middle_stages == 0) != (rest == 0) or (middle_stages and rest % (middle_stages * v)):
        return None
    middle = rest // (middle_stages * v) if middle_stages else 0
    per_rank = [middle * v] * p
    if layout.first_stage_layers:
        per_rank[0] = layout.first_stage_layers
    if layout.last_stage_layers:
        per_rank[-1] = layout.last_stage_layers
    return [[n // v] * v for n in per_rank]


def stage_layers(num_layers: int, layout: Layout) -> list[list[int]]:
    """Transformer layers each pipeline rank builds, per virtual chunk (``split_problems`` must
    be empty): what megatron-core's ``get_num_layers_to_build`` gives every (rank, chunk)."""
    return [list(rank) for rank in _stage_layers(num_layers, layout)]


@lru_cache(maxsize=4096)  # the planner asks for the same layouts' splits many times
def _stage_layers(num_layers: int, layout: Layout) -> tuple[tuple[int, ...], ...]:
    if layout.even:
        return ((num_layers // (layout.pp * layout.vpp),) * layout.vpp,) * layout.pp
    counts = _split(num_layers, layout)
    if counts is None:
        raise ValueError(split_problems(num_layers, layout)[0])
    return tuple(tuple(rank) for rank in counts)


def pipeline_splits(num_layers: int, pp: int) -> list[dict]:
    """The splits the planner tries at ``pp`` (``Layout`` field values; {} is even): even when
    the layers divide; otherwise megatron's embedding and/or loss counted as layers (how NVIDIA
    runs Llama 3.1 405B's 126 layers at PP=8), and equal first and last stages one share short
    with the middle stages even (the embedding and the loss weigh on those two)."""
    if pp == 1 or num_layers % pp == 0:
        return [{}]
    out: list[dict] = []
    for embedding, loss in ((True, True), (True, False), (False, True)):
        if (num_layers + embedding + loss) % pp == 0:
            out.append({"embedding_in_split": embedding, "loss_in_split": loss})
    ends = next((k for k in range(num_layers // pp, 0, -1)
                 if pp > 2 and (num_layers - 2 * k) % (pp - 2) == 0), None)
    if ends:
        out.append({"first_stage_layers": ends, "last_stage_layers": ends})
    return out


@lru_cache(maxsize=16384)
def rank_layers(num_layers: int, layout: Layout, rank: int) -> int:
    """Layers of pipeline rank ``rank`` (-1: the last), over its chunks; cached for the planner."""
    return sum(_stage_layers(num_layers, layout)[rank])


@lru_cache(maxsize=4096)
def most_rank_layers(num_layers: int, layout: Layout) -> int:
    """Layers of the fullest pipeline rank: the stage that sets the pipeline's pace."""
    return max(sum(rank) for rank in _stage_layers(num_layers, layout))

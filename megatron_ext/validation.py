"""Held-out loss per data source, every ``train.eval_interval`` steps and after the last.

megatron's own machinery does the work: its GPT datasets give each source's validation split
(``launch.eval_schema`` says which), and the pipeline schedule's ``forward_only`` pass (the one
Megatron-LM's ``evaluate`` uses) computes the per-token loss under any TP/PP/VPP/CP/DP layout
with the training step's forward function. Every evaluation reads the same samples (the first
``eval_iters`` global batches of each split, megatron's seeded order), so two evaluations differ
only by the weights, on every layout and after a resume. Training is untouched: the pass runs in
eval mode under ``no_grad``, reads no training sample and draws no random number.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
from megatron.core.pipeline_parallel import get_forward_backward_func

from launch.eval_schema import EvalSource, eval_sources
from launch.schema import RunConfig
from megatron_ext import parallel
from megatron_ext.data import BatchPlan, GlobalBatch, dataset_config, sft_dataset
from megatron_ext.passes import SourcePasses
from megatron_ext.step import forward_step


def build_eval_dataset(cfg: RunConfig, source: EvalSource, cache_dir: str) -> GPTDataset:
    """The validation split of one source, ``eval_iters`` global batches long (megatron's
    builder: rank 0 writes the sample index into the cache first)."""
    t = cfg.train
    if cfg.data.kind == "sft":  # the held-out conversations, repeated to fill eval_iters batches
        return SourcePasses.covering(sft_dataset(cfg, source.path, 1, source.split), t.seed,
                                     t.eval_iters * t.global_batch_size)
    config = dataclasses.replace(
        dataset_config(cfg, cache_dir, ([source.path], None) if source.path else None),
        split=source.split)
    config.split_matrix = [None, config.split_matrix[1], None]  # no index for the other parts
    dataset_cls = GPTDataset if source.path else MockGPTDataset
    return BlendedMegatronDatasetBuilder(dataset_cls, [0, t.eval_iters * t.global_batch_size, 0],
                                         lambda: True, config).build()[1]


@dataclass
class RiseTracker:
    """Counts, per source, the evaluations in a row at which its loss rose; says so at ``k``."""

    k: int
    last: dict[str, float] = field(default_factory=dict)
    streak: dict[str, int] = field(default_factory=dict)

    def update(self, step: int, losses: dict[str, float]) -> list[str]:
        out = []
        for name, loss in losses.items():
            rose = name in self.last and loss > self.last[name]
            self.streak[name] = self.streak.get(name, 0) + 1 if rose else 0
            if self.k and self.streak[name] >= self.k:
                out.append(f"validation loss of {name} rose at {self.streak[name]} evaluations "
                           f"in a row: {self.last[name]:.4f} -> {loss:.4f} at step {step}")
            self.last[name] = loss
        return out


class Validator:
    """Runs the evaluation the loop asks for; build it with ``from_config``."""

    def __init__(self, cfg: RunConfig, sources: list[tuple[str, GPTDataset]],
                 plan: BatchPlan) -> None:
        self._sources, self._plan, self._t = sources, plan, cfg.train
        self._rises = RiseTracker(cfg.resilience.spikes.val_rises)
        self._param_hooks = cfg.parallel.overlap_param_gather
        self.timeout_s = cfg.resilience.watchdog.first_step_timeout_s
        """The watchdog's bound for one pass: the start-up one (the first pass warms up too)."""
        self.rising: list[str] = []
        """What the last pass found rising for ``resilience.spikes.val_rises`` passes in a row."""

    @classmethod
    def from_config(cls, cfg: RunConfig, plan: BatchPlan, cache_dir: str
                    ) -> "Validator | NullValidator":
        sources = eval_sources(cfg)
        if not sources:
            return NullValidator()
        return cls(cfg, [(s.name, build_eval_dataset(cfg, s, cache_dir)) for s in sources], plan)

    def due(self, step: int) -> bool:
        return step % self._t.eval_interval == 0 or step == self._t.steps

    def run(self, model: list[torch.nn.Module], step: int) -> dict[str, float]:
        """``val/<source>/loss``, the token-weighted ``val/loss`` and ``val/time_s``, the same
        on every rank."""
        began = time.monotonic()
        for chunk in model:
            chunk.eval()
            if self._param_hooks:  # as Megatron-LM's evaluate: finish the gather, then no hooks
                chunk.disable_forward_pre_hook()
        try:
            totals = self._sums(model)
        finally:
            for chunk in model:
                chunk.train()
                if self._param_hooks:
                    chunk.enable_forward_pre_hook()
        losses = {name: (totals[2 * i] / max(totals[2 * i + 1], 1)).item()
                  for i, (name, _) in enumerate(self._sources)}
        self.rising = self._rises.update(step, losses)
        overall = (totals[0::2].sum() / max(totals[1::2].sum(), 1)).item()
        return {"val/loss": overall, **{f"val/{name}/loss": v for name, v in losses.items()},
                "val/time_s": time.monotonic() - began}

    def _sums(self, model: list[torch.nn.Module]) -> torch.Tensor:
        """Loss sum and token count of each source over the whole job (one all-reduce)."""
        device = next(model[0].parameters()).device
        totals = torch.zeros(2 * len(self._sources), dtype=torch.float64, device=device)
        t, plan = self._t, self._plan
        with torch.no_grad():
            for i, (_, dataset) in enumerate(self._sources):
                for batch in range(t.eval_iters):
                    batches = iter(GlobalBatch(dataset, plan, batch * t.global_batch_size,
                                               counts=False))
                    losses = get_forward_backward_func()(
                        forward_step_func=forward_step, data_iterator=[batches] * len(model),
                        model=model, num_microbatches=plan.num_microbatches,
                        seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
                        forward_only=True)
                    for item in losses if parallel.reports_loss() else []:
                        totals[2 * i:2 * i + 2] += item["lm loss"].to(device, torch.float64)
        dist.all_reduce(totals)
        return totals.cpu()


class NullValidator:
    """Validation off: never due."""

    timeout_s = 0.0
    rising: list[str] = []

    def due(self, step: int) -> bool:
        return False

"""Compose the Hydra tree into a typed ``RunConfig`` and check it before anything starts.

``validate`` returns every problem at once, one line each, naming the dotted field, its
value and what would be valid: a user fixes a bad sweep in one edit, not ten reruns.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from launch.eval_schema import eval_problems
from launch.problems import divisors
from launch.parallel_schema import layout_from, split_problems
from launch.schema import Layout, ModelConfig, RunConfig, runs_local_spec, stage_layers

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """The composed configuration cannot run; the message lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def one_line_error(err: Exception) -> str:
    """Hydra's multi-line report cut to the field and its first line (plus allowed options)."""
    cause = err.__cause__ if isinstance(err, HydraException) and err.__cause__ else err
    key = getattr(cause, "full_key", "") or "config"
    lines = str(cause).splitlines() or [repr(cause)]
    listed = lines[: next((i for i, l in enumerate(lines) if "search path" in l), len(lines))]
    options = [line.strip() for line in listed if line.startswith("\t")]  # Hydra's option list
    allowed = f" (available: {', '.join(options)})" if options else ""
    return f"error: {key}: {lines[0].strip(chr(34))}{allowed}"


def register_schema() -> None:
    ConfigStore.instance().store(name="base_config", node=RunConfig)


def compose(overrides: list[str] = (), run_dir: str = "unused") -> DictConfig:
    """Compose ``conf/`` outside a Hydra app (tools, tests); same result as ``python -m launch``."""
    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[*overrides, f"run_dir={run_dir}"])
    return cfg


def explicit_keys(overrides: Sequence[str]) -> frozenset[str]:
    """The keys the command line sets (``train.micro_batch_size=2`` gives
    ``train.micro_batch_size``; a group choice such as ``train=pretrain`` gives ``train``), so the
    planner keeps what the user chose. ``python -m launch`` passes Hydra's task overrides."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return frozenset(o.key_or_group for o in parsed if not o.is_delete())


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The typed object; interpolations are resolved here, once."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def load(path: str | Path) -> RunConfig:
    """Read a ``config.yaml`` written by the launcher (what every rank does first)."""
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))
    return to_run_config(merged)


def derive_layout(cfg: RunConfig) -> Layout:
    """The explicit layout of ``cfg.parallel``; DP fills what TP*PP*CP leave of the world."""
    p = cfg.parallel
    dp = p.dp if p.dp is not None else max(cfg.cluster.world_size // (p.tp * p.pp * p.cp), 1)
    return layout_from(p, dp)


def _packing_problems(cfg: RunConfig, layout: Optional[Layout]) -> list[str]:
    """Packed fine-tuning sequences need the explicit block-diagonal mask: the local layer spec
    applies it; only the first and last pipeline stages read the batch (step.forward_step);
    the CP attention does not take it. Transformer Engine's THD path is not exercised here, so
    it is not offered (megatron_ext.sft_data)."""
    if cfg.data.kind != "sft" or not cfg.data.packing:
        return []
    needs = {"model.transformer_impl=local or CPU ranks": runs_local_spec(cfg)}
    if layout is not None:  # parallel=auto: checked once the planner has chosen one
        needs.update({"parallel.pp=1": layout.pp == 1, "parallel.cp=1": layout.cp == 1})
    return [f"data.packing=true needs {need}; set data.packing=false (one conversation per "
            "sequence, padded) otherwise" for need, ok in needs.items() if not ok]


def _layout_problems(cfg: RunConfig, layout: Layout) -> list[str]:
    m, t, world = cfg.model, cfg.train, cfg.cluster.world_size
    out: list[str] = []
    if layout.world_size != world:
        valid = divisors(world)
        out.append(
            f"parallel: tp*pp*cp*dp = {layout.tp}*{layout.pp}*{layout.cp}*{layout.dp} = "
            f"{layout.world_size} must equal the world size cluster.nodes*cluster.gpus_per_node"
            f" = {world}; tp*pp*cp must be one of {valid}")
    gpus = cfg.cluster.gpus_per_node
    if layout.tp > gpus:
        out.append(f"parallel.tp={layout.tp} exceeds cluster.gpus_per_node={gpus}; tensor "
                   "parallelism stays within one node")
    elif gpus % layout.tp:
        out.append(f"parallel.tp={layout.tp} must divide cluster.gpus_per_node={gpus}, else "
                   f"some TP groups span two nodes; allowed: {divisors(gpus)}")
    out += m.tensor_parallel_problems(layout.tp)
    split = split_problems(m.num_layers, layout)
    out += split
    chunks = {n for rank in stage_layers(m.num_layers, layout) for n in rank} if not split else set()
    if t.recompute == "full" and any(n % t.recompute_num_layers for n in chunks):
        out.append(f"train.recompute_num_layers={t.recompute_num_layers} must divide the "
                   f"layers of every model chunk ({sorted(chunks)}: model.num_layers split over "
                   "parallel.pp*parallel.vpp): full recompute checkpoints them in equal groups")
    if t.global_batch_size % (t.micro_batch_size * layout.dp):
        out.append(f"train.global_batch_size={t.global_batch_size} must be divisible by "
                   f"train.micro_batch_size*dp = {t.micro_batch_size}*{layout.dp}")
    elif layout.vpp > 1 and (t.global_batch_size // (t.micro_batch_size * layout.dp)) % layout.pp:
        out.append("interleaved pipelining (parallel.vpp > 1) needs the number of micro-batches "
                   f"train.global_batch_size/(train.micro_batch_size*dp) to be a multiple of "
                   f"parallel.pp={layout.pp}")
    if layout.cp > 1 and t.seq_length % (2 * layout.cp):
        out.append(f"train.seq_length={t.seq_length} must be divisible by 2*parallel.cp = "
                   f"{2 * layout.cp} (context parallelism splits it into 2*cp chunks)")
    elif layout.sp and (t.seq_length // layout.cp) % layout.tp:
        out.append(f"train.seq_length/parallel.cp = {t.seq_length // layout.cp} must be divisible "
                   f"by parallel.tp={layout.tp} with parallel.sp=true (each CP rank's tokens are "
                   "split over TP)")
    out += _context_parallel_problems(m, layout)
    if layout.sp and runs_local_spec(cfg):
        out.append("parallel.sp=true needs the Transformer Engine spec (model.transformer_impl="
                   "transformer_engine on GPU ranks); the local spec's norm refuses sequence "
                   f"parallelism, and it is what {_local_spec_reason(cfg)}")
    return out


def _context_parallel_problems(m: ModelConfig, layout: Layout) -> list[str]:
    """CP runs where megatron can: Transformer Engine's fused or flash attention on GPUs (and
    the local spec's CPU rehearsal attention on CPU ranks, megatron_ext/cp_attention.py)."""
    if layout.cp == 1:
        return []
    out = []
    if m.transformer_impl == "local":
        out.append(f"parallel.cp={layout.cp} needs model.transformer_impl=transformer_engine: "
                   "megatron's local attention has no context parallelism on GPUs")
    if m.attention_backend == "unfused":
        out.append(f"parallel.cp={layout.cp} needs model.attention_backend=fused or flash: "
                   "Transformer Engine's unfused attention has no context-parallel backend")
    return out


def _local_spec_reason(cfg: RunConfig) -> str:
    if cfg.model.transformer_impl == "local":
        return "model.transformer_impl=local builds"
    return f"cluster.kind={cfg.cluster.kind}'s ranks build here, on CPU (no GPU on this machine)"


def validate(cfg: RunConfig, layout: Optional[Layout] = None) -> list[str]:
    """Every problem with ``cfg`` (and its layout), as one-line messages; empty when valid."""
    out: list[str] = []
    for section in (cfg.model, cfg.parallel, cfg.cluster, cfg.train, cfg.optimizer,
                    cfg.checkpoint, cfg.data, cfg.logging, cfg.resilience):
        out += section.problems()
    out += eval_problems(cfg)
    shapes_ok = not (cfg.model.problems() or cfg.parallel.problems() or cfg.cluster.problems()
                     or cfg.train.micro_batch_size <= 0 or cfg.train.seq_length <= 0)
    if not shapes_ok:
        return out  # the divisibility rules below need positive sizes
    if cfg.train.seq_length > cfg.model.max_position_embeddings:
        out.append(f"train.seq_length={cfg.train.seq_length} exceeds "
                   f"model.max_position_embeddings={cfg.model.max_position_embeddings}")
    if cfg.train.precision == "fp8" and cfg.model.transformer_impl != "transformer_engine":
        out.append("train.precision=fp8 needs model.transformer_impl=transformer_engine")
    if cfg.parallel.overlap_param_gather and not cfg.optimizer.distributed:
        out.append("parallel.overlap_param_gather=true needs optimizer.distributed=true (only the "
                   "distributed optimizer all-gathers updated parameters)")
    gpu = not cfg.cluster.cpu_ranks
    out += cfg.kernels.problems(local_spec_on_gpu=gpu and cfg.model.transformer_impl == "local",
                                fp32_on_gpu=gpu and cfg.train.precision == "fp32")
    chosen = layout or (None if cfg.parallel.auto else derive_layout(cfg))
    out += _packing_problems(cfg, chosen)
    if not cfg.parallel.auto:
        out += _layout_problems(cfg, chosen)
    return out


def check(cfg: RunConfig, layout: Optional[Layout] = None) -> None:
    problems = validate(cfg, layout)
    if problems:
        raise ConfigError(problems)


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def with_values(cfg: RunConfig, **changes: Any) -> RunConfig:
    """A copy of ``cfg`` with dotted-key changes, e.g. ``{"parallel.tp": 2}``."""
    node = OmegaConf.structured(cfg)
    for key, value in changes.items():
        OmegaConf.update(node, key, value, merge=False)
    return to_run_config(node)

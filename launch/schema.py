"""Typed run configuration: the one vocabulary shared by launch, tools and every rank.

Stdlib only, so the planner, the memory predictor and the ranks can import it cheaply.
Field names follow Megatron (``model.num_layers``, ``parallel.tp``, ``train.seq_length``...).
Sections stay unfrozen because Hydra needs to apply overrides; the derived ``Layout`` is
frozen. Each section reports its own problems as messages that name the field, the value
and what is allowed; ``launch.config.validate`` adds the cross-section rules. The cluster,
logging and resilience sections, the derived layout and the run folder's file names live in
their own modules and are re-exported here.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

from launch.cluster_schema import ClusterConfig
from launch.kernels_schema import KernelsConfig
from launch.parallel_schema import Layout, ParallelConfig, stage_layers  # noqa: F401
from launch.problems import choice_problem, positive_problem
from launch.run_folder import (ALERTS_SENT, ATTEMPT_LOG_FROM, EXIT_TRANSIENT,  # noqa: F401
                               FAILURES, NO_RESTART, REQUEUE_REQUEST, RUN_CONFIG)
from launch.watch_schema import LoggingConfig, ResilienceConfig

TRANSFORMER_IMPLS = ("transformer_engine", "local")
ATTENTION_BACKENDS = ("flash", "fused", "unfused")
PRECISIONS = ("bf16", "fp8", "fp32")
RECOMPUTE = ("none", "selective", "full")
LR_DECAY_STYLES = ("cosine", "linear", "constant")
DATA_KINDS = ("synthetic", "indexed", "sft")
SFT_MASK_SUFFIX = "_loss_mask"
"""``data.kind=sft``: the loss mask of ``<prefix>`` is the indexed dataset ``<prefix>_loss_mask``
(tools.prepare_data --format chat writes both)."""
NAN_ACTIONS = ("stop", "skip")
LR_SCHEDULE_ON_RESUME = ("error", "checkpoint", "config")


@dataclass
class ModelConfig:
    """A Llama-style decoder: GQA attention, SwiGLU MLP, RMSNorm, RoPE."""

    name: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    """Key/value heads (GQA); equal to num_attention_heads for plain multi-head attention."""
    ffn_hidden_size: int = 352
    vocab_size: int = 512
    """Vocabulary the embedding is built for; the tokenizer's must not be larger."""
    max_position_embeddings: int = 2048
    rotary_base: int = 500000
    rope_scaling_factor: float = 0.0
    """Llama 3.1/3.2 RoPE scaling ("rope_type": "llama3"): 8 for 3.1, 32 for 3.2; 0 = none.
    megatron-core applies it with low_freq_factor 1, high_freq_factor 4 and
    original_max_position_embeddings 8192, the values every Llama 3.1/3.2 release uses."""
    norm_epsilon: float = 1e-5
    untie_embeddings_and_output_weights: bool = True
    make_vocab_size_divisible_by: int = 128
    """Embedding rows are padded to a multiple of this times TP (Megatron's rule)."""
    init_method_std: float = 0.02
    transformer_impl: str = "transformer_engine"
    """Layer spec: Transformer Engine on GPU; CPU ranks always use the local spec."""
    attention_backend: str = "fused"
    """Transformer Engine's attention kernel: fused (cuDNN, ships with TE), flash (needs the
    flash-attn package in the image), or unfused (materialises the s x s attention scores)."""

    def problems(self) -> list[str]:
        out = choice_problem("model.transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)
        out += choice_problem("model.attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "vocab_size", "max_position_embeddings",
                     "make_vocab_size_divisible_by"):
            out += positive_problem(f"model.{name}", getattr(self, name))
        if self.rope_scaling_factor < 0:
            out.append(f"model.rope_scaling_factor={self.rope_scaling_factor} must be >= 0 "
                       "(0: no RoPE scaling)")
        if out:
            return out
        if self.hidden_size % self.num_attention_heads:
            out.append(f"model.hidden_size={self.hidden_size} must be divisible by "
                       f"model.num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            out.append(f"model.num_query_groups={self.num_query_groups} must divide "
                       f"model.num_attention_heads={self.num_attention_heads}")
        return out

    def tensor_parallel_problems(self, tp: int, field: str = "parallel.tp") -> list[str]:
        """What megatron-core's tensor-parallel layers split ``tp`` ways: the attention heads
        (``TransformerConfig``), the fused QKV projection and the MLP width (``linear_qkv``,
        ``linear_fc2``); KV groups split ``tp`` ways or, fewer than ``tp``, are replicated
        (``Attention``: then ``tp`` must be a multiple of them). ``field`` names the TP size."""
        out = []
        if self.num_attention_heads % tp:
            out.append(f"{field}={tp} must divide model.num_attention_heads="
                       f"{self.num_attention_heads}")
        if self.num_query_groups % tp and tp % self.num_query_groups:
            out.append(f"{field}={tp} must divide model.num_query_groups="
                       f"{self.num_query_groups} or be a multiple of it (megatron replicates "
                       "KV heads over the TP ranks)")
        qkv = (self.num_attention_heads + 2 * self.num_query_groups) * (
            self.hidden_size // self.num_attention_heads)
        if not out and qkv % tp:  # KV replicated: the fused QKV projection is split as a whole
            out.append(f"{field}={tp} must divide the fused QKV width (model.num_attention_heads"
                       f" + 2*model.num_query_groups) * head width = {qkv}")
        if self.ffn_hidden_size % tp:
            out.append(f"{field}={tp} must divide model.ffn_hidden_size="
                       f"{self.ffn_hidden_size} (the MLP's projections are split over the TP "
                       "ranks)")
        return out


@dataclass
class TrainConfig:
    steps: int = 300
    tokens: int = 0
    """Tokens the whole campaign trains on, for ``tools.schedule`` (its steps are tokens /
    (global_batch_size x seq_length)); 0: not planned. Training itself runs ``steps``."""
    epochs: float = 0.0
    """Fine-tuning (``data.kind=sft``): passes over the training conversations; > 0 sets
    ``steps`` from the prepared data's count of sequences (``launch.sft_epochs``)."""
    global_batch_size: int = 16
    micro_batch_size: int = 4
    seq_length: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    lr_decay_style: str = "cosine"
    precision: str = "bf16"
    """bf16 (fp32 master weights) or fp8 on GPU; CPU ranks always compute in fp32."""
    recompute: str = "none"
    recompute_num_layers: int = 1
    seed: int = 1234
    reproducible_init: bool = False
    """Draw each weight whole from its global name, so every layout starts from the same model
    (one full matrix at a time on the CPU: for small and medium models)."""
    log_interval: int = 10
    eval_interval: int = 0
    """Steps between validation passes (one more after the last step); 0: no validation."""
    eval_iters: int = 0
    """Global batches of each validation source per pass (``launch.eval_schema``)."""
    init_from: str = ""
    """Continued pre-training: start from these weights (a Hugging Face Llama directory, one
    written by ``tools.convert_hf import``, or a training run's ``checkpoint.dir`` or one of its
    committed ``step_<N>`` folders: model weights only, any layout) with a fresh optimizer and
    lr schedule; ignored when a checkpoint to resume from exists. Empty: random initialisation."""
    on_nan: str = "stop"
    """A non-finite loss: ``stop`` the run (one alert; the last committed checkpoint is intact),
    or ``skip`` the step (no parameter update, one alert per run) and go on."""
    lr_schedule_on_resume: str = "error"
    """Resuming with another lr/wd schedule than the checkpoint's: ``error`` refuses at launch
    (Megatron-LM's default), ``checkpoint`` keeps the saved one (its use_checkpoint_opt_param_
    scheduler), ``config`` follows this config from the saved step (override_opt_param_scheduler)."""
    probe_warmup_steps: int = 0
    """A probe (``train=probe``) when > 0: rank 0 writes the median step time of the steps after
    these to ``probe.json`` for ``tools.calibrate``; no checkpoint is loaded or saved."""

    def problems(self) -> list[str]:
        out = choice_problem("train.precision", self.precision, PRECISIONS)
        out += choice_problem("train.lr_schedule_on_resume", self.lr_schedule_on_resume,
                              LR_SCHEDULE_ON_RESUME)
        if self.init_from and not os.path.isdir(self.init_from):
            out.append(f"train.init_from={self.init_from!r} is not a directory; give a Hugging "
                       "Face Llama directory, one written by python -m tools.convert_hf import, "
                       "or a training run's checkpoint.dir")
        out += choice_problem("train.recompute", self.recompute, RECOMPUTE)
        out += choice_problem("train.on_nan", self.on_nan, NAN_ACTIONS)
        out += choice_problem("train.lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        for name in ("steps", "global_batch_size", "micro_batch_size", "seq_length", "lr",
                     "log_interval", "recompute_num_layers"):
            out += positive_problem(f"train.{name}", getattr(self, name))
        if self.epochs < 0:
            out.append(f"train.epochs={self.epochs} must be >= 0 (0: train.steps counts)")
        if self.tokens < 0:
            out.append(f"train.tokens={self.tokens} must be >= 0 (0: no campaign planned)")
        if self.min_lr < 0 or self.min_lr > self.lr:
            out.append(f"train.min_lr={self.min_lr} must be between 0 and train.lr={self.lr}")
        if self.probe_warmup_steps and not 0 < self.probe_warmup_steps <= self.steps - 5:
            out.append(f"train.probe_warmup_steps={self.probe_warmup_steps} must be 0 (no probe) "
                       f"or > 0 and leave at least 5 of train.steps={self.steps} to measure")
        if not 0 <= self.warmup_steps < self.steps:
            out.append(f"train.warmup_steps={self.warmup_steps} must be >= 0 and below "
                       f"train.steps={self.steps}")
        return out


@dataclass
class OptimizerConfig:
    """Adam with decoupled weight decay, as Megatron's FusedAdam/torch AdamW."""

    distributed: bool = True
    """Shard fp32 master weights and Adam moments over the data-parallel group (ZeRO-1)."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    grad_reduce_in_fp32: bool = True
    """Keep DDP's gradient buffer and its DP reduction in fp32 (4 bytes per parameter); false
    keeps and reduces them in bf16 (2 bytes, half the traffic), as NVIDIA's tuned recipes do
    (``conf/recipe/nvidia.yaml``). CPU ranks train in fp32 either way."""

    def problems(self) -> list[str]:
        out: list[str] = []
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                out.append(f"optimizer.{name}={getattr(self, name)} must be in [0, 1)")
        if self.weight_decay < 0:
            out.append(f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        out += positive_problem("optimizer.adam_eps", self.adam_eps)
        if self.clip_grad < 0:
            out.append(f"optimizer.clip_grad={self.clip_grad} must be >= 0 (0 disables clipping)")
        return out


@dataclass
class CheckpointConfig:
    """Distributed checkpoints: asynchronous writes, atomic commit, exact resume (issue 5)."""

    dir: str = "???"
    """Where committed checkpoints live; stable across requeues so a rerun resumes."""
    save_interval: int = 100
    """Steps between saves; 0 saves only at the end."""
    save_on_exit: bool = True
    """Save after the last step, so a finished run can be continued or converted."""
    async_save: bool = True
    """Write shards in a background process while training goes on; false blocks until
    written (slower, for debugging the writer)."""
    interval_minutes: float = 0.0
    """Also save when this much wall-clock time passed since the last save; 0 disables.
    Bounds the work lost on long steps, where a step interval is hard to pick."""
    keep_last: int = 3
    """Committed checkpoints kept (newest first); older ones are deleted after a commit."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this, for evaluation; 0: none."""
    on_corrupt: str = "fallback"
    """The newest committed checkpoint fails verification against its manifest: ``fallback``
    to the previous committed one (with a warning), or ``error`` to stop the run. An error while
    loading a verified one stops the run either way (a requeue tries it again)."""
    verify: str = "checksums"
    """What resume (and ``train.init_from`` of a training checkpoint) checks before loading a
    checkpoint. ``checksums``: every shard's SHA-256
    against the one its writer recorded (the ranks share the re-reading; catches bytes that
    changed with the size intact). ``sizes``: file sizes and metadata only (faster resume of
    very large checkpoints on slow storage). Checksums are recorded at every save either way."""
    optimizer_format: str = "dp_reshardable"
    """How the distributed optimizer's state is stored. ``dp_reshardable`` (megatron-LM's
    default): every rank writes its own shard, no communication; reloads only into a layout
    that differs in DP alone. ``fully_reshardable``: gathered per parameter on DP rank 0
    (slow: measured 10x the blocking time on CPU); reloads into any TP/PP/DP layout."""
    s3_uri: str = ""
    """``s3://bucket[/prefix]``: rank 0 also copies every committed checkpoint to
    ``<s3_uri>/step_<N>/`` in the background and applies retention to the copies S3 holds;
    '' = off. A copy is complete only once its ``COMMITTED.json`` is there (uploaded last). A run
    whose ``checkpoint.dir`` holds no intact checkpoint restores the newest complete copy that
    verifies. Each point of a ``-m`` sweep uses ``<s3_uri>/<point>``. Endpoint,
    region and credentials come from the environment (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, an
    instance role...), never from this file."""
    s3_exit_timeout_s: float = 300.0
    """After training, how long the process may stay alive to finish S3 copies still running;
    what is left is uploaded when a job with this ``checkpoint.dir`` starts next."""

    def problems(self) -> list[str]:
        out = [f"checkpoint.{name}={getattr(self, name)} must be >= 0"
               for name in ("save_interval", "interval_minutes", "keep_every",
                            "s3_exit_timeout_s")
               if getattr(self, name) < 0]
        if self.s3_uri and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S*)?",
                                            self.s3_uri):
            out.append(f"checkpoint.s3_uri={self.s3_uri!r} must be '' (no S3 copies) or "
                       "s3://<bucket>[/<prefix>], e.g. s3://my-bucket/llama3-8b")
        if self.keep_last < 1:
            out.append(f"checkpoint.keep_last={self.keep_last} must be >= 1 (the run resumes "
                       "from the newest checkpoint)")
        out += choice_problem("checkpoint.optimizer_format", self.optimizer_format,
                              ("dp_reshardable", "fully_reshardable"))
        out += choice_problem("checkpoint.verify", self.verify, ("checksums", "sizes"))
        return out + choice_problem("checkpoint.on_corrupt", self.on_corrupt, ("fallback", "error"))


@dataclass
class DataSource:
    path: str = "???"
    """Prefix of a Megatron indexed dataset (``<path>.bin`` and ``<path>.idx``)."""
    weight: float = 1.0


@dataclass
class DataConfig:
    kind: str = "indexed"
    sources: list[DataSource] = field(default_factory=list)
    tokenizer: str = ""
    """A Hugging Face ``tokenizer.json``, or the local directory holding it (nothing is
    downloaded); its end-of-document token is the ``tokenizer_config.json`` eos_token, else
    ``<|endoftext|>`` or Llama 3's ``<|end_of_text|>``."""
    split: str = "98,1,1"
    validation: list[DataSource] = field(default_factory=list)
    """Held-out datasets read whole by validation, beside each source's validation split."""
    prepare_demo: bool = False
    """Build the shipped demo corpus, tokenizer and dataset first if they are missing."""
    packing: bool = True
    """``data.kind=sft``: several conversations per training sequence, none attending to another
    (CPU ranks / the local layer spec, PP=1, CP=1); false: one conversation per sequence, padded."""

    def problems(self) -> list[str]:
        out = choice_problem("data.kind", self.kind, DATA_KINDS)
        if self.kind == "sft":
            out += [f"data.sources[{i}].path={s.path!r} has no loss mask {s.path}"
                    f"{SFT_MASK_SUFFIX}.idx; data.kind=sft reads what python -m "
                    "tools.prepare_data --format chat writes"
                    for i, s in enumerate(self.sources)
                    if not os.path.isfile(f"{s.path}{SFT_MASK_SUFFIX}.idx")]
        if self.kind in ("indexed", "sft"):
            if not self.sources:
                out.append(f"data.sources is empty; data.kind={self.kind} needs at least one "
                           "{path, weight} entry (or use data=synthetic)")
            if not self.tokenizer:
                out.append(f"data.tokenizer is empty; data.kind={self.kind} needs a "
                           "tokenizer.json path")
        for i, source in enumerate(self.sources):
            out += positive_problem(f"data.sources[{i}].weight", source.weight)
        parts = self.split.split(",")
        if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts):
            out.append(f"data.split={self.split!r} must be three comma-separated numbers, "
                       "e.g. '98,1,1'")
        return out


@dataclass
class LaunchConfig:
    dry_run: bool = False
    """Print the resolved config (and the sbatch script on Slurm) without submitting."""
    wait: bool = True
    """Local runs: stream rank 0's progress and wait for the job to end."""


@dataclass
class RunConfig:
    name: str = "demo"
    run_dir: str = "???"
    """This launch's folder: config.yaml, logs and the submitted script."""
    sweep: str = ""
    """Set by launch for a Hydra multirun (``-m``): the sweep this run is a point of, so its W&B
    runs group together; empty for a single run."""
    sweep_point: str = ""
    """Set with ``sweep``: this point's overrides (``train.lr=0.003``), which tell its W&B run and
    its Slack alerts from the other points'."""
    model: ModelConfig = field(default_factory=ModelConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    @property
    def display_name(self) -> str:
        """The run's name where people read it (W&B, Slack), with its sweep point if any."""
        return f"{self.name} [{self.sweep_point}]" if self.sweep_point else self.name


def runs_local_spec(cfg: RunConfig) -> bool:
    """Whether the ranks build megatron's local (plain torch) layer spec rather than Transformer
    Engine's: asked for, or CPU ranks (as ``megatron_ext.model.uses_transformer_engine``)."""
    return cfg.model.transformer_impl == "local" or cfg.cluster.cpu_ranks

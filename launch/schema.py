"""Typed run configuration: the one vocabulary shared by launch, tools and every rank.

Stdlib only, so the planner, the memory predictor and the ranks can import it cheaply.
Field names follow Megatron (``model.num_layers``, ``parallel.tp``, ``train.seq_length``...).
Sections stay unfrozen because Hydra needs to apply overrides; the derived ``Layout`` is
frozen. Each section reports its own problems as messages that name the field, the value
and what is allowed; ``launch.config.validate`` adds the cross-section rules.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

TRANSFORMER_IMPLS = ("transformer_engine", "local")
ATTENTION_BACKENDS = ("flash", "fused", "unfused")
PRECISIONS = ("bf16", "fp8", "fp32")
RECOMPUTE = ("none", "selective", "full")
LR_DECAY_STYLES = ("cosine", "linear", "constant")
DATA_KINDS = ("synthetic", "indexed")
CLUSTER_KINDS = ("local", "slurm")
INTERCONNECTS = ("none", "efa")
SIGNAL_SPEC = re.compile(r"(USR1|USR2|TERM|INT|HUP|URG)@[0-9]{1,5}")
"""Signals a rank can catch without side effects, and seconds before the time limit."""
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|WEBHOOK", re.IGNORECASE)
WANDB_MODES = ("online", "offline", "disabled")
GPU_TYPES = ("H100", "H200", "A100", "B200")
"""GPU models the planner and the MFU metric know the peak of (tools/flops.py)."""
NAN_ACTIONS = ("stop", "skip")


def choice_problem(name: str, value: Any, allowed: tuple[str, ...]) -> list[str]:
    """One message if ``value`` is not among ``allowed``."""
    if value in allowed:
        return []
    return [f"{name}={value!r} is not allowed; choose one of: {', '.join(allowed)}"]


def positive_problem(name: str, value: float) -> list[str]:
    return [] if value > 0 else [f"{name}={value!r} must be > 0"]


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
    attention_backend: str = "flash"
    """flash or fused kernels, or unfused (materialises the s x s attention scores)."""

    def problems(self) -> list[str]:
        out = choice_problem("model.transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)
        out += choice_problem("model.attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "vocab_size", "max_position_embeddings"):
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


@dataclass
class ParallelConfig:
    """How the model is split. ``auto`` asks the planner (tools/planner.py) for the layout."""

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

    def problems(self) -> list[str]:
        out: list[str] = []
        for name in ("tp", "pp", "vpp", "cp"):
            out += positive_problem(f"parallel.{name}", getattr(self, name))
        if self.dp is not None:
            out += positive_problem("parallel.dp", self.dp)
        if self.sp and self.tp == 1:
            out.append("parallel.sp=true needs parallel.tp > 1 (sequence parallelism splits "
                       "along the tensor-parallel group)")
        if self.vpp > 1 and self.pp == 1:
            out.append(f"parallel.vpp={self.vpp} needs parallel.pp > 1 (virtual stages "
                       "interleave a real pipeline)")
        return out


@dataclass
class ClusterConfig:
    """Where the job runs: the local machine (default) or a Slurm cluster profile.

    The Slurm fields are rendered into the sbatch script by launch/sbatch.py; every string
    reaching it is shell-quoted, and those that become ``#SBATCH`` lines must be one line.
    """

    name: str = "local"
    kind: str = "local"
    nodes: int = 1
    gpus_per_node: int = 2
    """Ranks per node: GPUs on a GPU node, CPU processes on the local cluster."""
    gpu: str = "H100"
    """GPU model: its dense bf16 peak is the MFU denominator and the planner's compute rate."""
    gpu_memory_gib: float = 80.0
    """Memory per GPU; the planner budgets with it and the health check expects it."""
    cpus_per_task: int = 1
    debug: bool = False
    """Local only: run a single rank in the foreground (submitit DebugExecutor); world size 1."""
    timeout_min: int = 60
    """Wall-clock limit (``--time``); the pre-timeout signal arrives before it."""
    partition: str = ""
    """Slurm partition (a PCS queue, a HyperPod instance group's partition); empty: the default."""
    account: str = ""
    """``--account`` to charge; empty: the user's default."""
    qos: str = ""
    """``--qos``; empty: the association's default."""
    exclusive: bool = False
    """Whole nodes (``--exclusive``): GPU training never shares a node."""
    gpus_per_node_directive: bool = False
    """Request GPUs with ``--gpus-per-node``. PCS registers GPUs as GRES, so it works there;
    HyperPod registers them only with accounting on, so its profiles rely on ``--exclusive``."""
    container_image: str = ""
    """pyxis/enroot image for the ranks (``srun --container-image``), e.g. a squashfs on FSx;
    empty: ranks run on the host with ``venv``'s (or the launching) Python."""
    container_mounts: str = ""
    """``srun --container-mounts`` (``src:dst[,src:dst]``), e.g. the shared filesystem."""
    venv: str = ""
    """Virtual environment on shared storage whose ``bin/python`` runs the ranks; empty: the
    launching interpreter, or ``python`` inside ``container_image``."""
    shared_dir: str = ""
    """Filesystem every node mounts (FSx for Lustre): run folder, data and checkpoints must live
    under it; empty: not checked."""
    interconnect: str = "none"
    """Network environment sourced on each node from ``slurm/env/<interconnect>.sh`` (efa: EFA
    and NCCL settings); none: nothing."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the ranks, written into the sbatch: never secrets (those come from
    the submitter's environment, which Slurm propagates)."""
    auto_resume: bool = False
    """HyperPod only: ``srun --auto-resume=1`` re-runs the training step on a replaced node."""
    requeue: bool = True
    """``--requeue``: preemption or node failure puts the job back in the queue, and a rank
    that saved on the pre-timeout signal asks for a requeue; the rerun resumes."""
    signal: str = "USR1@120"
    """``--signal``: SIGNAL@SECONDS before the time limit, the ranks save and exit to be requeued."""
    healthcheck: bool = True
    """Run slurm/healthcheck.sh on every node before training (a no-op without nvidia-smi)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def problems(self) -> list[str]:
        out = choice_problem("cluster.kind", self.kind, CLUSTER_KINDS)
        out += choice_problem("cluster.interconnect", self.interconnect, INTERCONNECTS)
        out += choice_problem("cluster.gpu", self.gpu, GPU_TYPES)
        for name in ("nodes", "gpus_per_node", "cpus_per_task", "timeout_min"):
            out += positive_problem(f"cluster.{name}", getattr(self, name))
        out += positive_problem("cluster.gpu_memory_gib", self.gpu_memory_gib)
        if self.debug and (self.kind != "local" or self.world_size != 1):
            out.append("cluster.debug=true runs one rank in the foreground: it needs "
                       "cluster.kind=local and cluster.gpus_per_node=1")
        if self.kind == "local" and self.nodes != 1:
            out.append(f"cluster.nodes={self.nodes} is not possible with cluster.kind=local; "
                       "use 1, or a Slurm profile such as cluster=slurm")
        for name in ("name", "partition", "account", "qos", "container_image",
                     "container_mounts", "venv", "shared_dir"):
            if any(ch in getattr(self, name) for ch in "\n\r\0"):
                out.append(f"cluster.{name}={getattr(self, name)!r} must be a single line")
        if not SIGNAL_SPEC.fullmatch(self.signal):
            out.append(f"cluster.signal={self.signal!r} must be SIGNAL@SECONDS, e.g. USR1@120")
        for key in self.env:
            if not ENV_NAME.fullmatch(key):
                out.append(f"cluster.env: {key!r} is not a valid environment variable name")
            elif SECRET_NAME.search(key):
                out.append(f"cluster.env.{key} looks like a secret; secrets are never written "
                           "into the job script: export it where you run sbatch instead")
        return out


@dataclass
class TrainConfig:
    steps: int = 300
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
    init_from: str = ""
    """Continued pre-training: start from these weights (a Hugging Face Llama directory or one
    written by ``tools.convert_hf import``) with a fresh optimizer and lr schedule; ignored when
    a checkpoint to resume from exists. Empty: random initialisation."""
    on_nan: str = "stop"
    """A non-finite loss: ``stop`` the run (one alert; the last committed checkpoint is intact),
    or ``skip`` the step (no parameter update, one alert per run) and go on."""

    def problems(self) -> list[str]:
        out = choice_problem("train.precision", self.precision, PRECISIONS)
        if self.init_from and not os.path.isdir(self.init_from):
            out.append(f"train.init_from={self.init_from!r} is not a directory; give a Hugging "
                       "Face Llama directory or one written by python -m tools.convert_hf import")
        out += choice_problem("train.recompute", self.recompute, RECOMPUTE)
        out += choice_problem("train.on_nan", self.on_nan, NAN_ACTIONS)
        out += choice_problem("train.lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        for name in ("steps", "global_batch_size", "micro_batch_size", "seq_length", "lr",
                     "log_interval", "recompute_num_layers"):
            out += positive_problem(f"train.{name}", getattr(self, name))
        if self.min_lr < 0 or self.min_lr > self.lr:
            out.append(f"train.min_lr={self.min_lr} must be between 0 and train.lr={self.lr}")
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
    """The newest committed checkpoint fails verification or loading: ``fallback`` to the
    previous committed one (with a warning), or ``error`` to stop the run."""
    optimizer_format: str = "dp_reshardable"
    """How the distributed optimizer's state is stored. ``dp_reshardable`` (megatron-LM's
    default): every rank writes its own shard, no communication; reloads only into a layout
    that differs in DP alone. ``fully_reshardable``: gathered per parameter on DP rank 0
    (slow: measured 10x the blocking time on CPU); reloads into any TP/PP/DP layout."""
    s3_uri: str = ""
    """``s3://bucket[/prefix]``: rank 0 also copies every committed checkpoint to
    ``<s3_uri>/step_<N>/`` in the background and mirrors retention deletions; '' = off. A copy
    is complete only once its ``COMMITTED.json`` is there (uploaded last). Endpoint, region and
    credentials come from the environment (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, an instance
    role...), never from this file."""
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
    prepare_demo: bool = False
    """Build the shipped demo corpus, tokenizer and dataset first if they are missing."""

    def problems(self) -> list[str]:
        out = choice_problem("data.kind", self.kind, DATA_KINDS)
        if self.kind == "indexed":
            if not self.sources:
                out.append("data.sources is empty; data.kind=indexed needs at least one "
                           "{path, weight} entry (or use data=synthetic)")
            if not self.tokenizer:
                out.append("data.tokenizer is empty; data.kind=indexed needs a tokenizer.json path")
        for i, source in enumerate(self.sources):
            out += positive_problem(f"data.sources[{i}].weight", source.weight)
        parts = self.split.split(",")
        if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts):
            out.append(f"data.split={self.split!r} must be three comma-separated numbers, "
                       "e.g. '98,1,1'")
        return out


@dataclass
class WandbConfig:
    mode: str = "disabled"
    project: str = "slurm-llm"
    entity: str = ""


@dataclass
class SlackConfig:
    """Slack incoming-webhook alerts; the URL is read from $SLACK_WEBHOOK_URL on the node."""

    enabled: bool = False
    min_interval_s: float = 300.0
    """At most one alert per event kind and rank within this window."""
    timeout_s: float = 5.0
    retries: int = 3


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    slack: SlackConfig = field(default_factory=SlackConfig)

    def problems(self) -> list[str]:
        out = choice_problem("logging.wandb.mode", self.wandb.mode, WANDB_MODES)
        out += positive_problem("logging.slack.timeout_s", self.slack.timeout_s)
        if self.slack.min_interval_s < 0:
            out.append(f"logging.slack.min_interval_s={self.slack.min_interval_s} must be >= 0")
        return out


@dataclass
class WatchdogConfig:
    """Hang detection: no completed step within the timeout dumps stacks and exits non-zero."""

    enabled: bool = True
    timeout_s: Optional[float] = None
    """None derives it: max(min_timeout_s, step_time_factor * the slowest step seen so far)."""
    min_timeout_s: float = 300.0
    step_time_factor: float = 10.0
    first_step_timeout_s: float = 1800.0
    """Budget for start-up and the first step (compilation, checkpoint load)."""


@dataclass
class StragglerConfig:
    """Per-rank step timing gathered every ``report_interval`` steps."""

    enabled: bool = True
    report_interval: int = 50
    threshold: float = 1.5
    """A rank whose compute time exceeds threshold * the median rank's is reported."""


@dataclass
class ResilienceConfig:
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    straggler: StragglerConfig = field(default_factory=StragglerConfig)
    collective_timeout_s: float = 600.0
    """torch.distributed timeout: a dead peer becomes an error, not an eternal wait."""

    def problems(self) -> list[str]:
        out = positive_problem("resilience.watchdog.min_timeout_s", self.watchdog.min_timeout_s)
        out += positive_problem("resilience.collective_timeout_s", self.collective_timeout_s)
        out += positive_problem("resilience.straggler.report_interval",
                                self.straggler.report_interval)
        if self.straggler.threshold <= 1:
            out.append(f"resilience.straggler.threshold={self.straggler.threshold} must be > 1 "
                       "(a slowdown factor relative to the median rank)")
        if self.watchdog.timeout_s is not None:
            out += positive_problem("resilience.watchdog.timeout_s", self.watchdog.timeout_s)
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
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


@dataclass(frozen=True)
class Layout:
    """A complete parallel layout; tp * pp * cp * dp == world_size."""

    tp: int
    pp: int
    cp: int
    dp: int
    vpp: int = 1
    sp: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def describe(self) -> str:
        return (f"TP={self.tp} PP={self.pp} VPP={self.vpp} CP={self.cp} DP={self.dp} "
                f"SP={'on' if self.sp else 'off'}")

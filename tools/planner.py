"""Find the fastest parallel layout that fits: enumerate, predict memory, estimate time, rank.

Pure Python, no torch. A candidate is a ``Layout`` x micro-batch size x recomputation mode;
the rules are those of ``launch.config.validate`` (a unit test checks every planned layout
against it), applied here without building a config per candidate so a 70B search on 256 GPUs
takes milliseconds.

Step-time model (one optimizer step, seconds), per rank:
  compute  = FLOPs / (world * peak * ACHIEVED_FRACTION), FLOPs = ``flops_per_token`` * tokens,
             plus recomputation: full repeats the layers' forward (+1/3 of their FLOPs),
             selective repeats the attention scores (+4 L h s per token);
  per micro-batch  t_mb = compute / m + kernel launches of L/p layers + TP, CP and PP
                   communication of one micro-batch;
  pipeline = t_mb * (m + (p - 1) / v)   (bubble fraction (p-1) / (m v + p - 1));
  step     = pipeline + DP gradient reduce-scatter and parameter all-gather (not overlapped:
             megatron_ext sets overlap_grad_reduce=False).
Communication time = bytes each GPU sends / bandwidth of the link the group spans: NVLink
inside a node, EFA across nodes. Megatron orders ranks tp, cp, dp, pp (tp fastest), so a group
stays inside a node when the product of its own and the faster sizes fits in one node.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

from launch.schema import RECOMPUTE, Layout, RunConfig
from tools.flops import GPU_PEAK_BF16_TFLOPS, flops_per_token, kv_channels
from tools.memory import predict, predict_all, stage_params

MICRO_BATCH_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Hardware:
    """What the step-time model needs to know about the GPUs and their links."""

    gpu: str = "H100"
    achieved_fraction: float = 0.45
    """Share of peak the matrix math reaches: 430-490 of 989 TFLOP/s measured for a 1.5B Llama
    with the TE spec on one H100 (ARCHITECTURE.md); communication and bubble are modelled apart."""
    nvlink_gb_s: float = 360.0
    """NCCL bus bandwidth per GPU inside an H100 node (NVLink 4, measured all-gather busbw)."""
    internode_gb_s: float = 50.0
    """Per GPU across nodes: p5's 3,200 Gb/s EFA shared by 8 GPUs (400 GB/s / 8)."""
    latency_s: float = 20e-6
    """Fixed cost of one NCCL collective or p2p transfer (small-message latency)."""
    layer_overhead_s: float = 100e-6
    """Kernel launches of one layer's forward and backward for one micro-batch (~40 kernels
    of a few microseconds); what makes tiny micro-batches and deep pipelines cost something."""

    @property
    def peak_flops(self) -> float:
        return GPU_PEAK_BF16_TFLOPS[self.gpu] * 1e12


H100_P5 = Hardware()


@dataclass(frozen=True)
class PlannedLayout:
    """One ranked candidate: the layout, its per-step settings and the predictions."""

    tp: int
    pp: int
    vpp: int
    cp: int
    dp: int
    sp: bool
    micro_batch_size: int
    recompute: str
    peak_gib: float
    step_time_s: float
    tokens_per_s_per_gpu: float
    fits: bool

    @property
    def layout(self) -> Layout:
        return Layout(tp=self.tp, pp=self.pp, cp=self.cp, dp=self.dp, vpp=self.vpp, sp=self.sp)

    def describe(self) -> str:
        return (f"{self.layout.describe()} micro_batch_size={self.micro_batch_size} "
                f"recompute={self.recompute}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: RunConfig) -> Iterator[Layout]:
    """Every layout ``launch.config.validate`` accepts for this model and cluster.

    TP within a node and dividing heads and query groups; PP * VPP dividing the layers; CP with
    the sequence divisible by 2 CP; DP = world / (TP PP CP); SP on whenever TP > 1 and the
    Transformer Engine spec is used (it only saves memory). Batch rules are per micro-batch.
    """
    m, world, s = cfg.model, cfg.cluster.world_size, cfg.train.seq_length
    for tp in _divisors(min(cfg.cluster.gpus_per_node, world)):
        if world % tp or m.num_attention_heads % tp or m.num_query_groups % tp:
            continue
        sp = tp > 1 and m.transformer_impl == "transformer_engine"
        if sp and s % tp:
            continue
        for pp in _divisors(world // tp):
            if m.num_layers % pp:
                continue
            for cp in _divisors(world // (tp * pp)):
                if cp > 1 and s % (2 * cp):
                    continue
                dp = world // (tp * pp * cp)
                for vpp in _divisors(m.num_layers // pp) if pp > 1 else [1]:
                    yield Layout(tp=tp, pp=pp, cp=cp, dp=dp, vpp=vpp, sp=sp)


def micro_batches(cfg: RunConfig, layout: Layout, micro_batch_size: int) -> Optional[int]:
    """Micro-batches per step, or None when the global batch rules out this combination."""
    per_replica = micro_batch_size * layout.dp
    if cfg.train.global_batch_size % per_replica:
        return None
    m = cfg.train.global_batch_size // per_replica
    return None if layout.vpp > 1 and m % layout.pp else m


def _bandwidth(hw: Hardware, cfg: RunConfig, span: int) -> float:
    """Bytes/s for a group whose ranks spread over ``span`` consecutive ranks."""
    inside = span <= cfg.cluster.gpus_per_node
    return (hw.nvlink_gb_s if inside else hw.internode_gb_s) * 1e9


def _compute_s(cfg: RunConfig, recompute: str, hw: Hardware) -> float:
    """Seconds of math per rank per step, recomputation included (see module docstring)."""
    m, s = cfg.model, cfg.train.seq_length
    per_token = flops_per_token(m, s)
    if recompute == "full":
        per_token += (per_token - 6.0 * m.hidden_size * m.vocab_size) / 3
    elif recompute == "selective":
        per_token += 4.0 * m.num_layers * m.hidden_size * s
    tokens = cfg.train.global_batch_size * s
    return per_token * tokens / (cfg.cluster.world_size * hw.peak_flops * hw.achieved_fraction)


def _micro_batch_comm_s(cfg: RunConfig, layout: Layout, b: int, recompute: str,
                        hw: Hardware) -> float:
    """TP, CP and PP communication of one micro-batch on one rank, each transfer costing
    ``latency_s`` plus bytes / bandwidth.

    TP: 4 all-gather/reduce-scatter (or 2 all-reduce) in forward and 4 in backward per layer,
    each moving (t-1)/t of the 2 s b h activation; full recompute repeats the forward's 4.
    CP: the ring passes K and V ((c-1) steps of 2 s/c b 2gd/t bytes) in forward and K, V and
    their gradients in backward. PP: one activation out and one gradient back per virtual stage.
    """
    m, t, c = cfg.model, layout.tp, layout.cp
    s_local, layers = cfg.train.seq_length / c, m.num_layers / layout.pp
    act = 2 * s_local * b * m.hidden_size
    tp_s = cp_s = pp_s = 0.0
    if t > 1:
        collectives = 12 if recompute == "full" else 8
        tp_s = layers * collectives * (
            hw.latency_s + (t - 1) / t * act / _bandwidth(hw, cfg, t))
    if c > 1:
        kv = 2 * s_local * b * 2 * m.num_query_groups * kv_channels(m) / t
        cp_s = layers * 3 * (c - 1) * (hw.latency_s + kv / _bandwidth(hw, cfg, t * c))
    if layout.pp > 1:
        shard = act / (t if layout.sp else 1)
        pp_s = 2 * layout.vpp * (hw.latency_s + shard / _bandwidth(hw, cfg, layout.world_size))
    return tp_s + cp_s + pp_s


def _dp_comm_s(cfg: RunConfig, layout: Layout, hw: Hardware) -> float:
    """Gradient reduction over the DP x CP group: reduce-scatter of fp32 gradients and
    all-gather of bf16 weights (distributed optimizer, 6 bytes/param), or an fp32 all-reduce
    (8 bytes/param), each moving (n-1)/n of the rank's parameters."""
    n = layout.dp * layout.cp
    if n == 1:
        return 0.0
    params = sum(stage_params(cfg, layout, first=True, last=layout.pp == 1))
    per_param = 6 if cfg.optimizer.distributed else 8
    return 2 * hw.latency_s + (n - 1) / n * params * per_param / _bandwidth(hw, cfg, layout.tp * n)


def step_time(cfg: RunConfig, layout: Layout, micro_batch_size: int, recompute: str,
              hw: Hardware = H100_P5) -> float:
    """Seconds per optimizer step (module docstring); the global batch must split evenly."""
    if micro_batches(cfg, layout, micro_batch_size) is None:
        raise ValueError(f"train.global_batch_size={cfg.train.global_batch_size} does not split "
                         f"into micro-batches of {micro_batch_size} over dp={layout.dp}")
    return _step_s(cfg, layout, micro_batch_size, recompute, hw, _compute_s(cfg, recompute, hw),
                   _dp_comm_s(cfg, layout, hw))


def _step_s(cfg: RunConfig, layout: Layout, b: int, recompute: str, hw: Hardware,
            compute_s: float, dp_s: float) -> float:
    m = cfg.train.global_batch_size // (b * layout.dp)
    launches = cfg.model.num_layers / layout.pp * hw.layer_overhead_s
    t_mb = compute_s / m + launches + _micro_batch_comm_s(cfg, layout, b, recompute, hw)
    return t_mb * (m + (layout.pp - 1) / layout.vpp) + dp_s


def _evaluate(cfg: RunConfig, layout: Layout, hw: Hardware,
              compute_s: dict[str, float]) -> list[PlannedLayout]:
    """Every micro-batch size x recompute mode of one layout."""
    settings = [(b, r) for b in MICRO_BATCH_SIZES if micro_batches(cfg, layout, b) is not None
                for r in RECOMPUTE]
    memory = predict_all(cfg, layout, settings)
    dp_s = _dp_comm_s(cfg, layout, hw)
    tokens_per_gpu = cfg.train.global_batch_size * cfg.train.seq_length / cfg.cluster.world_size
    out = []
    for (b, recompute), mem in zip(settings, memory):
        seconds = _step_s(cfg, layout, b, recompute, hw, compute_s[recompute], dp_s)
        out.append(PlannedLayout(
            tp=layout.tp, pp=layout.pp, vpp=layout.vpp, cp=layout.cp, dp=layout.dp,
            sp=layout.sp, micro_batch_size=b, recompute=recompute, peak_gib=mem.peak_gib,
            step_time_s=seconds, tokens_per_s_per_gpu=tokens_per_gpu / seconds, fits=mem.fits))
    return out


def search(cfg: RunConfig, hw: Hardware = H100_P5) -> list[PlannedLayout]:
    """Every valid candidate, fitting ones first, each group by step time then memory."""
    compute_s = {r: _compute_s(cfg, r, hw) for r in RECOMPUTE}
    out = [c for layout in candidate_layouts(cfg) for c in _evaluate(cfg, layout, hw, compute_s)]
    return sorted(out, key=lambda c: (not c.fits, c.step_time_s, c.peak_gib))


def plan(cfg: RunConfig, hw: Hardware = H100_P5) -> list[PlannedLayout]:
    """The candidates that fit in memory, best (fastest) first; empty when nothing fits."""
    return [c for c in search(cfg, hw) if c.fits]


def configure(cfg: RunConfig, chosen: PlannedLayout) -> RunConfig:
    """``cfg`` with the chosen layout, micro-batch and recomputation written in explicitly,
    so the ranks read a complete layout and never plan."""
    parallel = dataclasses.replace(cfg.parallel, auto=False, tp=chosen.tp, pp=chosen.pp,
                                   vpp=chosen.vpp, cp=chosen.cp, dp=chosen.dp, sp=chosen.sp)
    train = dataclasses.replace(cfg.train, micro_batch_size=chosen.micro_batch_size,
                                recompute=chosen.recompute)
    return dataclasses.replace(cfg, parallel=parallel, train=train)


def explain_no_fit(cfg: RunConfig, layout: Layout, hw: Hardware = H100_P5) -> Optional[str]:
    """None when ``layout`` (with cfg.train's micro-batch and recompute) fits; otherwise one
    message with its predicted memory and the best layout that does fit, for launch to print."""
    memory = predict(cfg, layout)
    if memory.fits:
        return None
    head = (f"{layout.describe()} micro_batch_size={cfg.train.micro_batch_size} "
            f"recompute={cfg.train.recompute} needs {memory.peak_gib:.1f} GiB per GPU on its "
            f"{memory.stage} pipeline stage, over the {memory.limit_gib:.1f} GiB limit "
            f"(cluster.gpu_memory_gib={cfg.cluster.gpu_memory_gib:g} less a "
            f"{memory.limit_gib / cfg.cluster.gpu_memory_gib:.0%} margin)")
    fitting = plan(cfg, hw)
    if not fitting:
        return head + "; no layout fits on this many GPUs: add nodes or shorten train.seq_length"
    best = fitting[0]
    return (head + f"; best that fits: {best.describe()} at {best.peak_gib:.1f} GiB, "
            f"{best.step_time_s:.2f} s/step (or use parallel=auto)")


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m tools.planner [--json] [overrides]``: the ranked table and the choice."""
    from tools.report import load_config, planner_table, progress_after  # CLI only

    args = sys.argv[1:] if argv is None else argv
    cfg, as_json = load_config(args, auto_ok=True)
    with progress_after(1.0, f"searching layouts for {cfg.cluster.world_size} GPUs..."):
        ranked = search(cfg)
    fitting = [c for c in ranked if c.fits]
    if as_json:
        best = dataclasses.asdict(fitting[0]) if fitting else None
        print(json.dumps({"layouts": [dataclasses.asdict(c) for c in fitting], "best": best}))
    else:
        print(planner_table(cfg, ranked))
    if not fitting:
        sys.exit(1)


if __name__ == "__main__":
    main()

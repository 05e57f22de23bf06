"""Find the fastest parallel layout that fits: enumerate, predict memory, estimate time, rank.

Pure Python, no torch. A candidate is a ``Layout`` x micro-batch size x recomputation mode;
the rules are those of ``launch.config.validate`` (a unit test checks every planned layout
against it), applied here without building a config per candidate so a 70B search on 256 GPUs
takes milliseconds. Settings the user gave explicitly are ``pinned``: the search keeps them.

Step-time model (one optimizer step, seconds), per rank:
  compute  = FLOPs / (world * peak * achieved fraction), FLOPs = ``flops_per_token`` * tokens,
             plus recomputation: full repeats the layers' forward (+1/3 of their FLOPs),
             selective repeats the attention scores (+4 L h s per token);
  per micro-batch  t_mb = compute / m + kernel launches of L/p layers + TP, CP and PP
                   communication of one micro-batch;
  pipeline = t_mb * (m + (p - 1) / v)   (bubble fraction (p-1) / (m v + p - 1)); with uneven
             stages t_mb is that of the stage with the most layers;
  step     = pipeline + DP gradient reduce-scatter and parameter all-gather, counted in full
             (parallel.overlap_grad_reduce / overlap_param_gather hide part of it; not
             modelled, so an upper bound for them).
Communication time = bytes each GPU sends / bandwidth of the link the group spans: NVLink
inside a node, the node's network across nodes (``Hardware.for_cluster``). Megatron orders
ranks tp, cp, dp, pp (tp fastest), so a group stays inside a node when the product of its own
and the faster sizes fits in one node.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Collection, Iterator, Mapping, Optional

from launch.problems import divisors
from launch.parallel_schema import most_rank_layers, pipeline_splits, split_problems
from launch.schema import RECOMPUTE, Layout, RunConfig, runs_local_spec, stage_layers
from launch.planning.flops import flops_per_token, kv_channels
from launch.planning.hardware import (NODE_NETWORK_GBIT_S, NVLINK_BUS_GB_S,  # noqa: F401
                                      TUNED_FRACTION, Hardware, tuned_recipe)
from launch.planning.memory import (activation_element_bytes, bytes_per_param, predict,
                                    predict_all, stage_params)

SEARCHED = ("parallel.tp", "parallel.pp", "parallel.vpp", "parallel.cp", "parallel.dp",
            "parallel.sp", "train.micro_batch_size", "train.recompute")
"""What the planner chooses, unless the command line gives it (``pinned``)."""
NOTHING_PINNED: Mapping[str, Any] = MappingProxyType({})


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
    """Predicted peak allocated memory (``MemoryBreakdown.peak_gib``)."""
    required_gib: float
    """All the device memory it needs (``MemoryBreakdown.required_gib``); ``fits`` judges this."""
    step_time_s: float
    tokens_per_s_per_gpu: float
    fits: bool
    first_stage_layers: Optional[int] = None
    """The uneven pipeline split (``Layout``'s last four fields), when the layers need one."""
    last_stage_layers: Optional[int] = None
    embedding_in_split: bool = False
    loss_in_split: bool = False

    @property
    def layout(self) -> Layout:
        return Layout(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Layout)})

    def describe(self) -> str:
        return (f"{self.layout.describe()} micro_batch_size={self.micro_batch_size} "
                f"recompute={self.recompute}")


def pinned(cfg: RunConfig, explicit: Collection[str]) -> dict[str, Any]:
    """The ``SEARCHED`` settings among ``explicit`` (dotted keys given on the command line, see
    ``launch.config.explicit_keys``), by short name, with their values from ``cfg``."""
    out = {}
    for key in SEARCHED:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if key in explicit and value is not None:
            out[name] = value
    return out


def describe_pinned(pins: Mapping[str, Any]) -> str:
    """`` with parallel.tp=8 ...`` for messages; empty when nothing is pinned."""
    given = [f"{key}={pins[key.split('.')[1]]}" for key in SEARCHED if key.split(".")[1] in pins]
    return f" with {' '.join(given)} as given" if given else ""


def candidate_layouts(cfg: RunConfig, pins: Mapping[str, Any] = NOTHING_PINNED) -> Iterator[Layout]:
    """Every layout ``launch.config.validate`` accepts for this model and cluster, and that
    keeps the ``pins``.

    TP dividing a node's GPUs, the heads and the MLP width, and dividing the query groups or a
    multiple of them (``ModelConfig.tensor_parallel_problems``); PP * VPP dividing the layers, or
    where they do not, megatron's uneven splits (``pipeline_splits``); CP
    with the sequence divisible by 2 CP (and, with SP, seq / CP by TP), where Transformer Engine's
    fused or flash attention runs it; DP = world / (TP PP CP); SP, unless pinned, on whenever
    TP > 1 and the Transformer Engine spec is used (it only saves memory; ``runs_local_spec``).
    Batch rules are per micro-batch.
    """
    m, world, s = cfg.model, cfg.cluster.world_size, cfg.train.seq_length
    cp_runs = m.transformer_impl == "transformer_engine" and m.attention_backend != "unfused"

    def kept(name: str, value: int) -> bool:
        return pins.get(name, value) == value

    local_spec = runs_local_spec(cfg)
    for tp in divisors(min(cfg.cluster.gpus_per_node, world)):
        if world % tp or m.tensor_parallel_problems(tp) or not kept("tp", tp):
            continue
        sp = pins.get("sp", tp > 1 and not local_spec)
        if sp and (tp == 1 or local_spec or s % tp):
            continue
        for pp in divisors(world // tp):
            if not kept("pp", pp):
                continue
            for cp in divisors(world // (tp * pp)):
                dp = world // (tp * pp * cp)
                if cp > 1 and (not cp_runs or s % (2 * cp) or (sp and (s // cp) % tp)):
                    continue
                if not kept("cp", cp) or not kept("dp", dp):
                    continue
                for split in pipeline_splits(m.num_layers, pp):
                    vpps = (([1] if pp == 1 else divisors(m.num_layers // pp)) if not split
                            else range(1, m.num_layers // pp + 2))  # uneven: as megatron checks
                    for vpp in vpps:
                        layout = Layout(tp=tp, pp=pp, cp=cp, dp=dp, vpp=vpp, sp=sp, **split)
                        if kept("vpp", vpp) and not (split and split_problems(m.num_layers,
                                                                              layout)):
                            yield layout


def settings(cfg: RunConfig, layout: Layout,
             pins: Mapping[str, Any] = NOTHING_PINNED) -> list[tuple[int, str]]:
    """The (micro_batch_size, recompute) pairs to try on ``layout``: the pinned values, or every
    size the global batch splits into and every mode. Full recomputation needs its groups of
    ``train.recompute_num_layers`` to tile each model chunk (megatron's uniform method)."""
    sizes = ([pins["micro_batch_size"]] if "micro_batch_size" in pins
             else divisors(cfg.train.global_batch_size))
    modes = [pins["recompute"]] if "recompute" in pins else RECOMPUTE
    chunks = {n for rank in stage_layers(cfg.model.num_layers, layout) for n in rank}
    tiled = all(n % cfg.train.recompute_num_layers == 0 for n in chunks)
    return [(b, r) for b in sizes if micro_batches(cfg, layout, b) is not None for r in modes
            if r != "full" or tiled]


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


def kv_exchange_bytes(cfg: RunConfig, layout: Layout, b: int) -> float:
    """Bytes of K and V one CP rank passes per ring step and layer in forward: those of its s/c
    tokens, TP-split, in the activation precision (what the CPU rehearsal's all-gather moves
    from each peer, tests/unit/test_memory_activations.py)."""
    m, e = cfg.model, activation_element_bytes(cfg.train.precision)
    return (2 * cfg.train.seq_length / layout.cp * b * m.num_query_groups * kv_channels(m) * e
            / layout.tp)


def _micro_batch_comm_s(cfg: RunConfig, layout: Layout, b: int, recompute: str,
                        hw: Hardware) -> float:
    """TP, CP and PP communication of one micro-batch on one rank, each transfer costing
    ``latency_s`` plus bytes / bandwidth.

    TP: 4 all-gather/reduce-scatter (or 2 all-reduce) in forward and 4 in backward per layer,
    each moving (t-1)/t of the 2 s b h activation; full recompute repeats the forward's 4.
    CP: the ring passes K and V ((c-1) steps of ``kv_exchange_bytes``) in forward and K, V and
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
        kv = kv_exchange_bytes(cfg, layout, b)
        cp_s = layers * 3 * (c - 1) * (hw.latency_s + kv / _bandwidth(hw, cfg, t * c))
    if layout.pp > 1:
        shard = act / (t if layout.sp else 1)
        pp_s = 2 * layout.vpp * (hw.latency_s + shard / _bandwidth(hw, cfg, layout.world_size))
    return tp_s + cp_s + pp_s


def _dp_comm_s(cfg: RunConfig, layout: Layout, hw: Hardware) -> float:
    """Gradient reduction over the DP x CP group: reduce-scatter of the gradients (fp32, or bf16
    with ``optimizer.grad_reduce_in_fp32=false``) and all-gather of the weights (distributed
    optimizer: 6 or 4 bytes/param with bf16 weights), or an all-reduce of the gradients (8 or
    4), each moving (n-1)/n of the rank's parameters."""
    n = layout.dp * layout.cp
    if n == 1:
        return 0.0
    params = sum(stage_params(cfg, layout, first=True, last=layout.pp == 1))
    weight, grad, _ = bytes_per_param(cfg.train.precision, cfg.optimizer.grad_reduce_in_fp32)
    per_param = grad + weight if cfg.optimizer.distributed else 2 * grad
    return 2 * hw.latency_s + (n - 1) / n * params * per_param / _bandwidth(hw, cfg, layout.tp * n)


def step_time(cfg: RunConfig, layout: Layout, micro_batch_size: int, recompute: str,
              hw: Optional[Hardware] = None) -> float:
    """Seconds per optimizer step (module docstring) on ``hw`` (default: ``cfg.cluster``'s);
    the global batch must split evenly."""
    if micro_batches(cfg, layout, micro_batch_size) is None:
        raise ValueError(f"train.global_batch_size={cfg.train.global_batch_size} does not split "
                         f"into micro-batches of {micro_batch_size} over dp={layout.dp}")
    hw = hw or Hardware.for_config(cfg)
    return _step_s(cfg, layout, micro_batch_size, recompute, hw, _compute_s(cfg, recompute, hw),
                   _dp_comm_s(cfg, layout, hw))


def _step_s(cfg: RunConfig, layout: Layout, b: int, recompute: str, hw: Hardware,
            compute_s: float, dp_s: float) -> float:
    m = cfg.train.global_batch_size // (b * layout.dp)
    # The stage with the most layers sets the pace (L / p on every stage when even).
    layers = most_rank_layers(cfg.model.num_layers, layout)
    share = layers * layout.pp / cfg.model.num_layers
    launches = layers * hw.layer_overhead_s
    t_mb = compute_s / m * share + launches + _micro_batch_comm_s(cfg, layout, b, recompute, hw)
    return t_mb * (m + (layout.pp - 1) / layout.vpp) + dp_s


def _evaluate(cfg: RunConfig, layout: Layout, hw: Hardware, compute_s: dict[str, float],
              pins: Mapping[str, Any]) -> list[PlannedLayout]:
    """Every micro-batch size x recompute mode of one layout (``settings``)."""
    tried = settings(cfg, layout, pins)
    memory = predict_all(cfg, layout, tried)
    dp_s = _dp_comm_s(cfg, layout, hw)
    tokens_per_gpu = cfg.train.global_batch_size * cfg.train.seq_length / cfg.cluster.world_size
    out = []
    for (b, recompute), mem in zip(tried, memory):
        seconds = _step_s(cfg, layout, b, recompute, hw, compute_s[recompute], dp_s)
        out.append(PlannedLayout(
            tp=layout.tp, pp=layout.pp, vpp=layout.vpp, cp=layout.cp, dp=layout.dp,
            sp=layout.sp, micro_batch_size=b, recompute=recompute, peak_gib=mem.peak_gib,
            required_gib=mem.required_gib, step_time_s=seconds,
            tokens_per_s_per_gpu=tokens_per_gpu / seconds, fits=mem.fits,
            first_stage_layers=layout.first_stage_layers,
            last_stage_layers=layout.last_stage_layers,
            embedding_in_split=layout.embedding_in_split, loss_in_split=layout.loss_in_split))
    return out


def search(cfg: RunConfig, pins: Mapping[str, Any] = NOTHING_PINNED) -> list[PlannedLayout]:
    """Every valid candidate keeping ``pins`` on ``cfg.cluster``'s hardware, fitting ones first,
    each group by step time then memory."""
    hw = Hardware.for_config(cfg)
    compute_s = {r: _compute_s(cfg, r, hw) for r in RECOMPUTE}
    out = [c for layout in candidate_layouts(cfg, pins)
           for c in _evaluate(cfg, layout, hw, compute_s, pins)]
    return sorted(out, key=lambda c: (not c.fits, c.step_time_s, c.required_gib))


def plan(cfg: RunConfig, pins: Mapping[str, Any] = NOTHING_PINNED) -> list[PlannedLayout]:
    """The candidates that fit in memory, best (fastest) first; empty when nothing fits."""
    return [c for c in search(cfg, pins) if c.fits]


def configure(cfg: RunConfig, chosen: PlannedLayout) -> RunConfig:
    """``cfg`` with the chosen layout, micro-batch and recomputation written in explicitly,
    so the ranks read a complete layout and never plan."""
    parallel = dataclasses.replace(
        cfg.parallel, auto=False, tp=chosen.tp, pp=chosen.pp, vpp=chosen.vpp, cp=chosen.cp,
        dp=chosen.dp, sp=chosen.sp, num_layers_in_first_pipeline_stage=chosen.first_stage_layers,
        num_layers_in_last_pipeline_stage=chosen.last_stage_layers,
        account_for_embedding_in_pipeline_split=chosen.embedding_in_split,
        account_for_loss_in_pipeline_split=chosen.loss_in_split)
    train = dataclasses.replace(cfg.train, micro_batch_size=chosen.micro_batch_size,
                                recompute=chosen.recompute)
    return dataclasses.replace(cfg, parallel=parallel, train=train)


def explain_no_fit(cfg: RunConfig, layout: Layout) -> Optional[str]:
    """None when ``layout`` (with cfg.train's micro-batch and recompute) fits; otherwise one
    message with its predicted memory and the best layout that does fit, for launch to print."""
    memory = predict(cfg, layout)
    if memory.fits:
        return None
    head = (f"{layout.describe()} micro_batch_size={cfg.train.micro_batch_size} "
            f"recompute={cfg.train.recompute} needs {memory.required_gib:.1f} GiB per GPU on its "
            f"{memory.stage} pipeline stage, over the {memory.limit_gib:.1f} GiB limit "
            f"(cluster.gpu_memory_gib={cfg.cluster.gpu_memory_gib:g} less a "
            f"{1 - memory.limit_gib / cfg.cluster.gpu_memory_gib:.0%} margin)")
    fitting = plan(cfg)
    if not fitting:
        return head + "; no layout fits on this many GPUs: add nodes or shorten train.seq_length"
    best = fitting[0]
    return (head + f"; best that fits: {best.describe()} at {best.required_gib:.1f} GiB, "
            f"{best.step_time_s:.2f} s/step (or use parallel=auto)")

"""Training throughput of the same Llama-style model, four ways side by side in one process.

``python benchmarks/throughput.py [hydra overrides]`` (defaults by device: a small model on CPU,
Llama 3.2 1B on a GPU) warms every way up, times them in turns (A B C D A B C D ...) so noise hits
all alike, prints a table and writes benchmarks/results/throughput_<device>.json.

- ``framework``: what ``megatron_ext.train.build`` builds, stepped by ``megatron_ext.train.Loop``
  as ``train()`` steps it (train_step, watchdog beat, straggler step, NaN check, checkpoint and
  stop-signal agreement, metrics).
- ``framework_no_resilience``: the same objects with the watchdog, straggler and spike detectors off.
- ``megatron_direct``: GPTModel + DDP + distributed optimizer + ``get_forward_backward_func``
  from megatron-core alone (its quick-start loop), on the process groups the framework made.
- ``pytorch``: ``plain_llama.PlainLlama`` with AdamW (``--compile``: torch.compile, GPU default).

TFLOP/s use ``launch.planning.flops.flops_per_token`` (the W&B metrics' formula); MFU (GPU only) is against
``launch.planning.flops.GPU_PEAK_BF16_TFLOPS`` of the GPU ``torch.cuda.get_device_name`` names. On CPU,
``megatron_ext.cpu.cpu_mode`` (megatron-core needs it) adds microseconds per torch call to all.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from plain_llama import PlainLlama  # beside this script

from launch.config import check, compose, derive_layout, to_run_config
from launch.schema import ModelConfig, RunConfig
from launch.planning.flops import GPU_PEAK_BF16_TFLOPS, flops_per_token, padded_vocab_size, param_count

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = {
    # Big enough that a step is mostly compute, small enough for 2 cores: ~0.7 s per step.
    "cpu": {"overrides": ["model=tiny", "model.name=small", "model.num_layers=4",
                          "model.hidden_size=256", "model.num_attention_heads=8",
                          "model.num_query_groups=4", "model.ffn_hidden_size=704",
                          "model.vocab_size=2048"],
            "seq_length": 256, "micro_batch_size": 4, "num_microbatches": 2,
            "steps": 2, "repeats": 10, "warmup": 2},
    # 1.24B parameters: three copies with their Adam state take ~65 GB, so micro-batches of one
    # sequence keep one step's activations within an H100's 80 GB.
    "gpu": {"overrides": ["model=llama3_1b"], "seq_length": 4096, "micro_batch_size": 1,
            "num_microbatches": 8, "steps": 3, "repeats": 6, "warmup": 3},
}
WAYS = ("framework", "framework_no_resilience", "megatron_direct", "pytorch")
Step = Callable[[], None]


@dataclass(frozen=True)
class Shape:
    seq_length: int
    micro_batch_size: int
    num_microbatches: int

    @property
    def tokens(self) -> int:
        """Tokens of one optimizer step (world size 1)."""
        return self.seq_length * self.micro_batch_size * self.num_microbatches


def gpu_key() -> str | None:
    """The ``GPU_PEAK_BF16_TFLOPS`` entry of this machine's GPU (None: CPU or an unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((key for key in GPU_PEAK_BF16_TFLOPS if key in name), None)


def run_config(overrides: list[str], shape: Shape, total_steps: int, run_dir: Path) -> RunConfig:
    """The framework's own config for a world-size-1 run on synthetic tokens, no saves."""
    t = [f"train.seq_length={shape.seq_length}", f"train.micro_batch_size={shape.micro_batch_size}",
         f"train.global_batch_size={shape.micro_batch_size * shape.num_microbatches}",
         f"train.steps={total_steps}", "train.warmup_steps=1", f"train.log_interval={total_steps}",
         "train.reproducible_init=false", "data=synthetic", "parallel=dp",
         "cluster.gpus_per_node=1", f"cluster.gpu={gpu_key() or 'H100'}",
         f"checkpoint.dir={run_dir / 'checkpoints'}", "checkpoint.save_interval=0",
         "checkpoint.save_on_exit=false", "logging.wandb.mode=disabled"]
    cfg = to_run_config(compose([*overrides, *t], run_dir=str(run_dir)))
    check(cfg)
    return cfg


# -- (a) this framework ---------------------------------------------------------------------
def framework_steps(cfg: RunConfig, use_gpu: bool) -> dict[str, Step]:
    """One step of megatron_ext.train's loop, with and without the watchdog, straggler and spike
    checks."""
    from megatron_ext.alerts import Alerts
    from megatron_ext.env import RunEnv
    from megatron_ext.spikes import NullSpikeDetector
    from megatron_ext.straggler import NullStragglerDetector
    from megatron_ext.train import Loop, build
    from megatron_ext.watchdog import NullWatchdog, Watchdog

    env, layout = RunEnv.from_env(), derive_layout(cfg)
    alerts = Alerts.from_config(cfg, rank=env.rank)
    run = build(cfg, env, layout, use_gpu, alerts)
    watchdog = Watchdog.from_config(cfg, rank=env.rank)
    on = Loop.start(cfg, env, layout, use_gpu, alerts, run, start_step=0, watchdog=watchdog)
    off = replace(on, watchdog=NullWatchdog(), straggler=NullStragglerDetector(),
                  spikes=NullSpikeDetector())
    position = {"step": 0, "consumed": 0}  # both ways advance the one run

    def step(loop: Loop) -> None:
        position["step"] += 1
        position["consumed"] = loop.step(position["step"], position["consumed"])

    return {"framework": partial(step, on), "framework_no_resilience": partial(step, off)}


# -- shared by (b) and (c) --------------------------------------------------------------------
def random_batches(m: ModelConfig, shape: Shape, device: torch.device
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, labels) per micro-batch, made once: the baselines read no data."""
    g, size = torch.Generator().manual_seed(0), (shape.micro_batch_size, shape.seq_length + 1)
    out = []
    for _ in range(shape.num_microbatches):
        seq = torch.randint(m.vocab_size, size, generator=g)
        out.append((seq[:, :-1].contiguous().to(device), seq[:, 1:].contiguous().to(device)))
    return out


# -- (b) megatron-core used directly -----------------------------------------------------------
def _direct_model(cfg: RunConfig, use_gpu: bool):
    """GPTModel in megatron's DDP with its distributed optimizer, from megatron-core alone."""
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend

    m, o = cfg.model, cfg.optimizer
    dtype = torch.bfloat16 if use_gpu else torch.float32
    config = TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size, normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=m.init_method_std, params_dtype=dtype, pipeline_dtype=dtype,
        bf16=use_gpu, use_cpu_initialization=not use_gpu,
        # The same kernel as the framework's; megatron also pins it process-wide in NVTE_* vars.
        attention_backend=AttnBackend[m.attention_backend] if use_gpu else AttnBackend.local)
    spec = (get_gpt_layer_with_transformer_engine_spec() if use_gpu
            else get_gpt_layer_local_spec(normalization="RMSNorm"))
    gpt = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=padded_vocab_size(m, 1),
                   max_sequence_length=m.max_position_embeddings, position_embedding_type="rope",
                   rotary_base=m.rotary_base,
                   share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights)
    model = DistributedDataParallel(
        config=config, module=gpt.cuda() if use_gpu else gpt,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                 use_distributed_optimizer=True))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=cfg.train.lr, weight_decay=o.weight_decay,
                        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                        clip_grad=o.clip_grad, bf16=use_gpu, params_dtype=dtype,
                        use_distributed_optimizer=True), [model])
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    return model, optimizer


def megatron_direct_step(cfg: RunConfig, shape: Shape, use_gpu: bool) -> Step:
    """megatron-core's quick-start loop; the process groups must already exist."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model, optimizer = _direct_model(cfg, use_gpu)
    device = torch.device("cuda" if use_gpu else "cpu")
    batches = random_batches(cfg.model, shape, device)
    positions = torch.arange(shape.seq_length, device=device).expand(shape.micro_batch_size, -1)

    def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = per_token.float().mean()
        return loss, {"lm loss": loss}

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        return model(tokens, positions, None, labels=labels), loss_func

    def step() -> None:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
            num_microbatches=shape.num_microbatches, seq_length=shape.seq_length,
            micro_batch_size=shape.micro_batch_size, forward_only=False)
        optimizer.step()

    return step


# -- (c) plain PyTorch ------------------------------------------------------------------------
def pytorch_step(cfg: RunConfig, shape: Shape, use_gpu: bool, compile_model: bool) -> Step:
    """fp32 weights, bf16 autocast on GPU, AdamW, clipping; optionally torch.compile'd."""
    m, o = cfg.model, cfg.optimizer
    device = torch.device("cuda" if use_gpu else "cpu")
    model = PlainLlama(m, shape.seq_length)
    model = model.cuda() if use_gpu else model  # (Module.to trips cpu_mode's device check)
    forward = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr,
                                  betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                  weight_decay=o.weight_decay, fused=use_gpu)
    batches = random_batches(m, shape, device)

    def step() -> None:
        for tokens, labels in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_gpu):
                logits = forward(tokens)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
            (loss / shape.num_microbatches).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# -- measuring ----------------------------------------------------------------------------------
def measure(steps: dict[str, Step], *, warmup: int, per_repeat: int, repeats: int,
            use_gpu: bool) -> dict[str, list[float]]:
    """Seconds per step of each way, one entry per repeat; the ways take turns every repeat."""
    # Framework last: its watchdog counts from its first step; compiling PyTorch takes minutes.
    for step in reversed(steps.values()):
        for _ in range(warmup):
            step()
    sync, times = torch.cuda.synchronize if use_gpu else lambda: None, {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            for _ in range(per_repeat):
                step()
            sync()
            times[name].append((time.perf_counter() - start) / per_repeat)
    return times


def summarize(times: dict[str, list[float]], shape: Shape, flops_tok: float,
              peak_tflops: float | None) -> dict[str, dict[str, float | None]]:
    """Median over repeats (robust to one noisy repeat), with the spread."""
    out: dict[str, dict[str, float | None]] = {}
    for name, seconds in times.items():
        rates = [shape.tokens / s for s in seconds]
        tokens_per_s = statistics.median(rates)
        tflops = tokens_per_s * flops_tok / 1e12
        out[name] = {"tokens_per_s": tokens_per_s, "tokens_per_s_min": min(rates),
                     "tokens_per_s_max": max(rates), "step_s": shape.tokens / tokens_per_s,
                     "tflops_per_device": tflops,
                     "mfu": tflops / peak_tflops if peak_tflops else None}
    return out


def ratios(summary: dict[str, dict[str, float | None]]) -> dict[str, float]:
    """Tokens/s of the framework over each other way (1.0: as fast)."""
    if "framework" not in summary:
        return {}
    mine = summary["framework"]["tokens_per_s"]
    return {f"framework/{name}": mine / s["tokens_per_s"]
            for name, s in summary.items() if name != "framework"}


def table(summary: dict[str, dict[str, float | None]]) -> str:
    lines = [f"{'way':<24} {'tokens/s':>10} {'(min-max)':>19} {'ms/step':>9} {'TFLOP/s':>9}    MFU"]
    for name, s in summary.items():
        mfu = f"{s['mfu']:.1%}" if s["mfu"] is not None else "-"
        lines.append(f"{name:<24} {s['tokens_per_s']:>10,.0f} "
                     f"{s['tokens_per_s_min']:>9,.0f}-{s['tokens_per_s_max']:<9,.0f} "
                     f"{s['step_s'] * 1000:>9.1f} {s['tflops_per_device']:>9.3f} {mfu:>6}")
    return "\n".join(lines)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _single_rank_env() -> None:
    """torch.distributed's env:// rendezvous for one process on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def parse_args(use_gpu: bool) -> argparse.Namespace:
    d = DEFAULTS["gpu" if use_gpu else "cpu"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", default=d["overrides"],
                        help=f"Hydra overrides of the model (default: {' '.join(d['overrides'])})")
    parser.add_argument("--seq-length", type=int, default=d["seq_length"])
    parser.add_argument("--micro-batch-size", type=int, default=d["micro_batch_size"])
    parser.add_argument("--num-microbatches", type=int, default=d["num_microbatches"])
    parser.add_argument("--steps", type=int, default=d["steps"], help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=d["repeats"])
    parser.add_argument("--warmup", type=int, default=d["warmup"], help="untimed steps per way")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=use_gpu,
                        help="torch.compile the PyTorch baseline (default: on GPU only)")
    parser.add_argument("--ways", default=",".join(WAYS), help="comma-separated subset, e.g. "
                        "'framework' alone for the largest model that fits")
    return parser.parse_args()


def run(args: argparse.Namespace, shape: Shape, use_gpu: bool
        ) -> tuple[RunConfig, dict[str, list[float]]]:
    """Build every wanted way in one process, then time them in turns."""
    from megatron_ext import parallel
    from megatron_ext.cpu import cpu_mode

    _single_rank_env()
    wanted = args.ways.split(",")
    with tempfile.TemporaryDirectory() as scratch, \
            contextlib.nullcontext() if use_gpu else cpu_mode():
        # The dataset must outlast every step; twice the count leaves room.
        cfg = run_config(args.overrides, shape, 2 * (args.warmup + args.steps * args.repeats),
                         Path(scratch))
        steps = framework_steps(cfg, use_gpu)  # first: it initialises the process groups
        if "megatron_direct" in wanted:
            steps["megatron_direct"] = megatron_direct_step(cfg, shape, use_gpu)
        if "pytorch" in wanted:
            steps["pytorch"] = pytorch_step(cfg, shape, use_gpu, args.compile)
        times = measure({n: s for n, s in steps.items() if n in wanted}, warmup=args.warmup,
                        per_repeat=args.steps, repeats=args.repeats, use_gpu=use_gpu)
        parallel.shutdown()
    return cfg, times


def main() -> None:
    use_gpu = torch.cuda.is_available()
    args = parse_args(use_gpu)
    if not use_gpu:
        torch.set_num_threads(os.cpu_count() or 1)  # one process: all cores
    shape = Shape(args.seq_length, args.micro_batch_size, args.num_microbatches)
    cfg, times = run(args, shape, use_gpu)
    key = gpu_key()
    peak = GPU_PEAK_BF16_TFLOPS[key] if key else None
    flops_tok = flops_per_token(cfg.model, shape.seq_length)
    summary = summarize(times, shape, flops_tok, peak)
    device = torch.cuda.get_device_name() if use_gpu else f"cpu ({os.cpu_count()} cores)"
    print(f"{cfg.model.name}: {param_count(cfg.model) / 1e6:,.1f}M parameters, {shape.tokens:,} "
          f"tokens/step (seq {shape.seq_length} x mbs {shape.micro_batch_size} x "
          f"{shape.num_microbatches} micro-batches), {flops_tok / 1e9:.3f} GFLOP/token, {device}")
    print(table(summary))
    result = {
        "command": shlex.join(["python", "benchmarks/throughput.py", *sys.argv[1:]]),
        "device": device, "gpu_peak_bf16_tflops": peak, "torch": torch.__version__,
        "megatron_core": _version("megatron-core"),
        "transformer_engine": _version("transformer-engine"),
        "model": asdict(cfg.model), "resilience": asdict(cfg.resilience),
        "params": param_count(cfg.model), "shape": asdict(shape),
        "tokens_per_step": shape.tokens, "flops_per_token": flops_tok,
        "steps_per_repeat": args.steps, "repeats": args.repeats, "warmup": args.warmup,
        "compile": args.compile, "seconds_per_step": times, "summary": summary,
        "ratios": ratios(summary),
    }
    print("  ".join(f"{k} = {v:.3f}" for k, v in result["ratios"].items()))
    out = RESULTS / f"throughput_{key.lower() if key else 'gpu' if use_gpu else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

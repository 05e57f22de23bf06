"""How long training is blocked per checkpoint: asynchronous vs synchronous save, same state.

``python benchmarks/checkpoint.py [--saves N] [--gpu | --no-gpu]`` starts torchrun ranks once per
model and mode; each rank builds its state with ``megatron_ext.train.build``, as a training run
does (``checkpoint.async_save`` says the mode), takes a step, saves ``--saves`` times and
prints a table with the sync/async ratio. Blocking time of an async save is the time in
``save()`` (planning; on GPU the copy to host memory) plus the ``maybe_save`` calls of the steps
that ran while the shards were written, up to and including the commit.

The device is the only difference (``DEVICES``), chosen by ``torch.cuda.is_available()`` as
``megatron_ext.train.main`` chooses it, or by ``--gpu``/``--no-gpu``:

- CPU: 2 ranks over gloo (``cpu_mode``), models tiny and 1024x8;
  benchmarks/results/checkpoint_cpu.json.
- GPU: one rank per visible GPU over NCCL, bf16 weights, the 1.4B model (its checkpoint with Adam
  state is ~20 GB; ``--scratch`` puts it on a disk with room for two);
  benchmarks/results/checkpoint_gpu.json. The target: async blocks >= 10x shorter than sync.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "tiny": ["model=tiny"],
    "1024x8": ["model=tiny", "model.name=1024x8", "model.hidden_size=1024", "model.num_layers=8",
               "model.num_attention_heads=16", "model.num_query_groups=4",
               "model.ffn_hidden_size=2816"],
    # 1.40e9 parameters: Llama 3's 128,256-token vocabulary (llama3_1b's tokenizer, tied
    # embeddings, GQA with 8 groups) and 24 layers of 2048 hidden, 16 heads, 5632 ffn.
    "1.4b": ["model=llama3_1b", "model.name=1.4b", "model.num_layers=24",
             "model.num_attention_heads=16", "model.ffn_hidden_size=5632",
             "train.seq_length=2048"],
}
DEVICES = {"cpu": {"models": ["tiny", "1024x8"], "description": "cpu, {n} ranks over gloo"},
           "gpu": {"models": ["1.4b"], "description": "{gpu} x {n}, NCCL"}}
MODES = {"sync": False, "async": True}
TARGET_RATIO, TARGET_PARAMS = 10.0, 1e9  # the target: >= 10x shorter for >= 1B params


def _time_saves(ckpt, step_fn, first_step: int, saves: int) -> dict[str, list[float]]:
    """Blocking and write-to-commit seconds of each save; training steps run in between."""
    blocked, committed = [], []
    for i in range(saves):
        step = first_step + i * 100
        start = time.perf_counter()
        ckpt.save(step, 0)
        blocking = time.perf_counter() - start
        while ckpt.last_committed_step != step:
            step_fn()
            t0 = time.perf_counter()
            ckpt.maybe_save(step + 1, 0)  # save_interval is 0: only finalizes
            blocking += time.perf_counter() - t0
        blocked.append(blocking)
        committed.append(time.perf_counter() - start)
    return {"blocking_s": blocked, "save_to_commit_s": committed}


def worker(config_path: str, out: str, saves: int) -> None:
    """One rank, set up as ``megatron_ext.train.main`` sets one up: build, a step, the saves."""
    from launch.config import derive_layout, load
    from megatron_ext import parallel
    from megatron_ext.alerts import Alerts
    from megatron_ext.cpu import cpu_mode
    from megatron_ext.env import RunEnv
    from megatron_ext.train import build, train_batch

    cfg, env = load(config_path), RunEnv.from_env()
    use_gpu = torch.cuda.is_available()  # CPU runs hide the GPUs (CUDA_VISIBLE_DEVICES="")
    if not use_gpu:
        torch.set_num_threads(cfg.cluster.cpus_per_task)
    with contextlib.nullcontext() if use_gpu else cpu_mode():
        run = build(cfg, env, derive_layout(cfg), use_gpu, Alerts.from_config(cfg, rank=env.rank))
        step_fn = partial(train_batch, run, cfg.train, 0)
        step_fn()  # Adam state exists, as in a real save
        result = {"params_per_rank": sum(p.numel() for m in run.model for p in m.parameters()),
                  **_time_saves(run.ckpt, step_fn, 1000, saves)}
        run.ckpt.close(0, 0)
        if env.rank == 0:
            root = Path(cfg.checkpoint.dir)
            result["checkpoint_mb"] = sum(p.stat().st_size for p in root.rglob("*")
                                          if p.is_file()) / 1e6
            shutil.rmtree(root)  # room for the next mode's checkpoints
            Path(out).write_text(json.dumps(result))
        parallel.shutdown()


def transformer_impl() -> str:
    """Transformer Engine where installed, else megatron's local spec: a GPU machine without
    TE still measures the checkpoint (same tensors; TE adds small ``_extra_state`` entries)."""
    return "transformer_engine" if importlib.util.find_spec("transformer_engine") else "local"


def run_mode(name: str, mode: str, nproc: int, saves: int, scratch: Path, gpu: bool) -> dict:
    """One torchrun launch: ``nproc`` ranks of one model saving in one mode."""
    from launch.config import check, compose, to_run_config, to_yaml
    from launch.planning.flops import param_count

    run_dir = scratch / name / mode
    run_dir.mkdir(parents=True)
    cfg = to_run_config(compose(
        [*MODELS[name], f"model.transformer_impl={transformer_impl()}", "data=synthetic",
         "train.steps=10", "train.warmup_steps=1",
         "train.reproducible_init=false",  # a 1.4B model's layout-free init takes a while
         "train.precision=bf16",  # bf16 weights on GPU, as training; CPU ranks use fp32 anyway
         "train.micro_batch_size=1", f"train.global_batch_size={2 * nproc}",
         f"cluster.gpus_per_node={nproc}", f"checkpoint.dir={run_dir / 'checkpoints'}",
         f"checkpoint.async_save={MODES[mode]}", "checkpoint.save_interval=0",
         "checkpoint.save_on_exit=false", "checkpoint.keep_last=1"], run_dir=str(run_dir)))
    check(cfg)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    print(f"{name} {mode}: {param_count(cfg.model):,} parameters, {nproc} ranks", flush=True)
    env = os.environ | ({} if gpu else {"CUDA_VISIBLE_DEVICES": ""})
    out = run_dir / "result.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(nproc), __file__, "--worker",
                    str(run_dir / "config.yaml"), "--out", str(out), "--saves", str(saves)],
                   check=True, env=env)
    return {"params": param_count(cfg.model), **json.loads(out.read_text())}


def run_model(name: str, nproc: int, saves: int, scratch: Path, gpu: bool) -> dict:
    """Both modes of one model, the same state (same seed, same step) saved each way."""
    by_mode = {mode: run_mode(name, mode, nproc, saves, scratch, gpu) for mode in MODES}
    sync, blocked = (statistics.median(by_mode[mode]["blocking_s"]) for mode in MODES)
    return {"params": by_mode["sync"]["params"],
            "params_per_rank": by_mode["sync"]["params_per_rank"],
            "checkpoint_mb": by_mode["async"]["checkpoint_mb"],
            **{mode: {k: r[k] for k in ("blocking_s", "save_to_commit_s")}
               for mode, r in by_mode.items()},
            "sync_over_async_blocking": sync / blocked}


def table(results: dict[str, dict]) -> str:
    lines = [f"{'model':<8} {'params':>14} {'params/rank':>14} {'ckpt MB':>9} {'sync block s':>13} "
             f"{'async block s':>14} {'sync/async':>11} {'async commit s':>15}"]
    for name, r in results.items():
        sync, blocked, commit_s = (statistics.median(r[mode][key]) for mode, key in (
            ("sync", "blocking_s"), ("async", "blocking_s"), ("async", "save_to_commit_s")))
        lines.append(f"{name:<8} {r['params']:>14,} {r['params_per_rank']:>14,} "
                     f"{r['checkpoint_mb']:>9.1f} {sync:>13.3f} {blocked:>14.3f} "
                     f"{r['sync_over_async_blocking']:>10.1f}x {commit_s:>15.3f}")
    for name, r in results.items():
        if r["params"] >= TARGET_PARAMS:
            met = "met" if r["sync_over_async_blocking"] >= TARGET_RATIO else "NOT met"
            lines.append(f"target for {name} (async blocks >= {TARGET_RATIO:g}x shorter than "
                         f"sync at >= {TARGET_PARAMS:.0e} params): {met}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--saves", type=int, default=3, help="saves per mode and model")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction,
                        default=torch.cuda.is_available(),
                        help="NCCL, one rank per visible GPU (default: when CUDA is available)")
    parser.add_argument("--scratch", help="folder for the checkpoints (default: the temp dir)")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.out, args.saves)
        return
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: torch sees no CUDA device")
    device = DEVICES["gpu" if args.gpu else "cpu"]
    nproc = max(torch.cuda.device_count(), 1) if args.gpu else 2
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        results = {name: run_model(name, nproc, args.saves, Path(scratch), args.gpu)
                   for name in device["models"]}
    print(table(results))
    out = RESULTS / f"checkpoint_{'gpu' if args.gpu else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    description = device["description"].format(
        n=nproc, gpu=torch.cuda.get_device_name() if args.gpu else None)
    out.write_text(json.dumps({
        "command": shlex.join(["python", "benchmarks/checkpoint.py", *sys.argv[1:]]),
        "device": description, "torch": torch.__version__, "transformer_impl": transformer_impl(),
        "models": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""How long training is blocked per checkpoint: asynchronous vs synchronous save, same state.

``python benchmarks/checkpoint.py`` starts 2 CPU ranks (gloo) per model through torchrun,
saves the same trained state ``--saves`` times each way and prints a table; the JSON goes to
benchmarks/results/checkpoint_cpu.json. Blocking time of an async save is the time in
``save()`` (planning, the fork) plus the ``maybe_save`` calls of the steps that ran while
the shards were written, up to and including the commit.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint_cpu.json"
MODELS = {
    "tiny": ["model=tiny"],
    "1024x8": ["model=tiny", "model.name=1024x8", "model.hidden_size=1024", "model.num_layers=8",
               "model.num_attention_heads=16", "model.num_query_groups=4",
               "model.ffn_hidden_size=2816"],
}


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
    """One rank: build the training state, take a step, then save it both ways."""
    from launch.config import derive_layout, load, to_yaml
    from megatron_ext import parallel
    from megatron_ext.checkpoint import Checkpointer
    from megatron_ext.cpu import cpu_mode
    from megatron_ext.data import BatchPlan, build_train_dataset, microbatches
    from megatron_ext.env import RunEnv
    from megatron_ext.model import build_model
    from megatron_ext.optim import build_optimizer, wrap_ddp
    from megatron_ext.step import train_step

    cfg = load(config_path)
    layout, t = derive_layout(cfg), cfg.train
    torch.set_num_threads(cfg.cluster.cpus_per_task)
    with cpu_mode():
        parallel.init(layout, RunEnv.from_env(), seed=t.seed, timeout_s=600, use_gpu=False)
        chunks, config = build_model(cfg.model, t, layout, use_gpu=False)
        model = wrap_ddp(chunks, config, cfg)
        optimizer, scheduler = build_optimizer(model, config, cfg)
        dataset = build_train_dataset(cfg, cache_dir=str(Path(cfg.run_dir) / "data_cache"))
        plan = BatchPlan(t.global_batch_size, t.micro_batch_size, layout.dp, parallel.dp_rank())

        def step_fn() -> None:
            train_step(model, optimizer, scheduler, microbatches(dataset, plan, 0),
                       num_microbatches=plan.num_microbatches, seq_length=t.seq_length,
                       micro_batch_size=t.micro_batch_size)

        step_fn()  # Adam state exists, as in a real save
        params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
        result = {"params_per_rank": params}
        for first_step, (mode, is_async) in enumerate((("sync", False), ("async", True)), 1):
            ck_cfg = replace(cfg.checkpoint, dir=str(Path(cfg.run_dir) / mode), async_save=is_async,
                             save_interval=0, save_on_exit=False, keep_last=1)
            ckpt = Checkpointer(ck_cfg, model=chunks, optimizer=optimizer, scheduler=scheduler,
                                layout=layout, config_yaml=to_yaml(cfg))
            result[mode] = _time_saves(ckpt, step_fn, first_step * 1000, saves)
            ckpt.close(0, 0)
        sizes = [p.stat().st_size for p in (Path(cfg.run_dir) / "async").rglob("*") if p.is_file()]
        result["checkpoint_mb"] = sum(sizes) / 1e6
        if torch.distributed.get_rank() == 0:
            Path(out).write_text(json.dumps(result))
        parallel.shutdown()


def run_model(name: str, overrides: list[str], saves: int, scratch: Path) -> dict:
    from launch.config import compose, to_run_config, to_yaml

    run_dir = scratch / name
    run_dir.mkdir()
    cfg = to_run_config(compose([*overrides, "data=synthetic", "train.steps=10",
                                 "train.warmup_steps=1", f"checkpoint.dir={run_dir}"],
                                run_dir=str(run_dir)))
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    out = run_dir / "result.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    __file__, "--worker", str(run_dir / "config.yaml"), "--out", str(out),
                    "--saves", str(saves)], check=True)
    return json.loads(out.read_text())


def table(results: dict[str, dict]) -> str:
    lines = [f"{'model':<8} {'params/rank':>12} {'ckpt MB':>8} {'sync block s':>13} "
             f"{'async block s':>14} {'speed-up':>9} {'async commit s':>15}"]
    for name, r in results.items():
        sync = statistics.median(r["sync"]["blocking_s"])
        blocked = statistics.median(r["async"]["blocking_s"])
        commit_s = statistics.median(r["async"]["save_to_commit_s"])
        lines.append(f"{name:<8} {r['params_per_rank']:>12,} {r['checkpoint_mb']:>8.1f} "
                     f"{sync:>13.3f} {blocked:>14.3f} {sync / blocked:>8.1f}x {commit_s:>15.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--saves", type=int, default=3, help="saves per mode and model")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.out, args.saves)
        return
    with tempfile.TemporaryDirectory() as scratch:
        results = {name: run_model(name, overrides, args.saves, Path(scratch))
                   for name, overrides in MODELS.items()}
    print(table(results))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"device": "cpu, 2 ranks over gloo", "torch": torch.__version__,
                                   "models": results}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

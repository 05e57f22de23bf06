"""Measure the peak GPU memory of the framework's own training step, beside launch.planning.memory's
prediction, into tests/data/memory_measurements.json (tests/unit/test_memory_measured.py
compares the two).

On a GPU node with the project's venv (Transformer Engine: benchmarks/gpu/install_te.sh):
    python benchmarks/gpu/measure_memory.py            # every configuration not yet measured
    python benchmarks/gpu/measure_memory.py --list     # the matrix and its predictions, no GPU
    python benchmarks/gpu/measure_memory.py --only m125m_s1024_b1_none_dist --redo
Each configuration runs ``python -m megatron_ext.train <config.yaml>`` as one rank (world size
1) in a fresh process: 4 optimizer steps of 2 micro-batches of synthetic tokens, bf16, no
checkpoint, W&B off. The trainer writes torch.cuda.max_memory_allocated/reserved to
metrics.jsonl after every step; the largest values are kept. A run that fails with CUDA out of
memory is recorded as ``oom`` (the test checks those are predicted not to fit); any other failure
is printed and not recorded. Results are saved after each configuration and measured ones are
skipped on the next call, so a time-limited session can continue where the last one stopped.

Multi-rank layouts cannot run on one GPU. A pipeline stage is measured by its world-size-1 shape:
the ``stage`` models are Llama 3 8B and 70B cut to the layers one pipeline rank holds (with the
embedding and output layer both, as a PP=1 run has). Tensor-parallel shards (a/t heads of width
d) have no world-size-1 config, so the TP/SP/CP splits, the in-flight micro-batches of pipeline
schedules and the distributed optimizer's DP sharding are not measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from launch.config import check, compose, derive_layout, to_run_config, to_yaml
from launch.cluster_schema import GPU_TYPES
from launch.schema import RunConfig
from launch.planning.memory import GIB, predict

REPO = Path(__file__).resolve().parents[2]
RESULT = REPO / "tests" / "data" / "memory_measurements.json"
MODELS = {
    # ~125M and ~350M Llama-style models (GPT-3 small / medium shapes with GQA and SwiGLU).
    "m125m": ["model=tiny", "model.name=m125m", "model.num_layers=12", "model.hidden_size=768",
              "model.num_attention_heads=12", "model.num_query_groups=4",
              "model.ffn_hidden_size=2048", "model.vocab_size=32000",
              "model.max_position_embeddings=8192", "model.rotary_base=500000"],
    "m350m": ["model=tiny", "model.name=m350m", "model.num_layers=24", "model.hidden_size=1024",
              "model.num_attention_heads=16", "model.num_query_groups=8",
              "model.ffn_hidden_size=2816", "model.vocab_size=32000",
              "model.max_position_embeddings=8192", "model.rotary_base=500000"],
    "1b": ["model=llama3_1b"],
    # Llama 3.2 3B: the largest Llama 3 that trains (18 bytes/parameter) on one 80 GB GPU.
    "3b": ["model=llama3_1b", "model.name=llama3_3b", "model.num_layers=28",
           "model.hidden_size=3072", "model.num_attention_heads=24", "model.ffn_hidden_size=8192"],
    "8b_stage": ["model=llama3_8b", "model.name=llama3_8b_pp4_stage", "model.num_layers=8"],
    "70b_stage": ["model=llama3_70b", "model.name=llama3_70b_1layer", "model.num_layers=1"],
}
# (model, sequence length, micro-batch size, recompute, distributed optimizer)
MATRIX = [
    ("m125m", 1024, 1, "none", True), ("m125m", 2048, 4, "none", True),
    ("m125m", 4096, 8, "selective", True), ("m125m", 8192, 2, "full", False),
    ("m350m", 1024, 8, "none", False), ("m350m", 2048, 2, "selective", True),
    ("m350m", 4096, 4, "full", True), ("m350m", 8192, 1, "none", True),
    ("1b", 1024, 4, "none", True), ("1b", 2048, 8, "full", True),
    ("1b", 4096, 2, "selective", False), ("1b", 8192, 1, "none", True),
    ("1b", 8192, 2, "full", False), ("1b", 8192, 8, "none", True),  # the last: expected OOM
    ("3b", 1024, 2, "none", True), ("3b", 2048, 1, "selective", True),
    ("3b", 4096, 1, "full", False), ("3b", 8192, 1, "full", True),
    ("3b", 4096, 4, "none", True),  # expected OOM
    ("8b_stage", 2048, 1, "none", True), ("8b_stage", 4096, 2, "full", True),
    ("8b_stage", 8192, 1, "selective", False),
    ("70b_stage", 2048, 1, "none", True), ("70b_stage", 4096, 1, "full", True),
]
LOCAL_SPEC = ("m350m", 2048, 2, "none", True)
"""One run of the local spec (unfused attention, torch RMSNorm) on the GPU."""


def name_of(entry: tuple, local: bool = False) -> str:
    model, seq, mbs, recompute, distributed = entry
    return (f"{model}_s{seq}_b{mbs}_{recompute}_{'dist' if distributed else 'nodist'}"
            + ("_local" if local else ""))


def overrides_of(entry: tuple, local: bool, gpu: str, memory_gib: float) -> list[str]:
    """Every override of one run: the test composes the same config from this list."""
    model, seq, mbs, recompute, distributed = entry
    return [*MODELS[model], *(["model.transformer_impl=local"] if local else []),
            "cluster=local", "cluster.gpus_per_node=1", f"cluster.gpu={gpu}",
            f"cluster.gpu_memory_gib={memory_gib:.2f}", "parallel=dp", "data=synthetic",
            "train.precision=bf16", f"train.seq_length={seq}", f"train.micro_batch_size={mbs}",
            f"train.global_batch_size={2 * mbs}", f"train.recompute={recompute}",
            "train.steps=4", "train.warmup_steps=1", "train.log_interval=1",
            f"optimizer.distributed={str(distributed).lower()}", "checkpoint.save_interval=0",
            "checkpoint.save_on_exit=false", "logging.wandb.mode=disabled"]


def config(overrides: list[str], run_dir: Path) -> RunConfig:
    cfg = to_run_config(compose([*overrides, f"checkpoint.dir={run_dir / 'checkpoints'}"],
                                run_dir=str(run_dir)))
    check(cfg)
    return cfg


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(cfg: RunConfig, run_dir: Path, timeout_s: float) -> dict:
    """Train as one rank; the peak counters from metrics.jsonl, or ``oom``; raises otherwise."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    command = [sys.executable, "-m", "megatron_ext.train", str(run_dir / "config.yaml")]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout_s)
    if run.returncode != 0:
        if "OutOfMemoryError" in run.stderr or "CUDA out of memory" in run.stderr:
            return {"oom": True}
        raise RuntimeError(f"exit {run.returncode}:\n{run.stderr[-3000:]}")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"oom": False,
            "allocated_gib": max(s["peak_memory_allocated_gib"] for s in steps),
            "reserved_gib": max(s["peak_memory_reserved_gib"] for s in steps)}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def device() -> tuple[str, float, dict]:
    """``cluster.gpu``, its memory in GiB, and what to record about the machine."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; measurements need a GPU (use --list to see "
                         "the matrix and its predictions)")
    name = torch.cuda.get_device_name(0)
    gpu = next((g for g in GPU_TYPES if g in name), None)
    if gpu is None:
        raise SystemExit(f"error: GPU {name!r} is none of cluster.gpu's {', '.join(GPU_TYPES)}")
    memory_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    info = {"device": name, "cuda": torch.version.cuda, "torch": torch.__version__,
            "megatron_core": _version("megatron-core"),
            "transformer_engine": _version("transformer-engine")}
    return gpu, memory_gib, info


def save(measurements: dict[str, dict], info: dict) -> None:
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({
        "command": "python benchmarks/gpu/measure_memory.py " + " ".join(sys.argv[1:]),
        "trainer": "python -m megatron_ext.train <run_dir>/config.yaml (RANK=0 WORLD_SIZE=1)",
        **info, "measurements": list(measurements.values())}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true",
                        help="print the matrix and its predictions for an H100 80 GB; no GPU")
    parser.add_argument("--only", nargs="*", default=None, help="configuration names")
    parser.add_argument("--redo", action="store_true", help="measure recorded ones again")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    args = parser.parse_args()
    runs = [(entry, False) for entry in MATRIX] + [(LOCAL_SPEC, True)]
    runs = [r for r in runs if args.only is None or name_of(*r) in args.only]
    gpu, memory_gib, info = ("H100", 80.0, {}) if args.list else device()
    saved = json.loads(RESULT.read_text()) if RESULT.exists() else {"measurements": []}
    done = {m["name"]: m for m in saved["measurements"]}
    with tempfile.TemporaryDirectory(prefix="measure_memory_") as scratch:
        for entry, local in runs:
            name, overrides = name_of(entry, local), overrides_of(entry, local, gpu, memory_gib)
            cfg = config(overrides, Path(scratch) / name)
            predicted = predict(cfg, derive_layout(cfg))
            measured = done[name].get("allocated_gib", "OOM") if name in done else "-"
            print(f"{name:<36} predicted {predicted.allocated_gib:7.2f} GiB allocated "
                  f"({'fits' if predicted.fits else 'does not fit'}), measured {measured}",
                  flush=True)
            if args.list or (name in done and not args.redo):
                continue
            try:
                result = measure(cfg, Path(scratch) / name, args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                print(f"{name}: FAILED, not recorded: {err}", file=sys.stderr)
                continue
            print(f"{'':<36} measured {result.get('allocated_gib', 'OOM')}", flush=True)
            done[name] = {"name": name, "overrides": overrides, **result,
                          "predicted": predicted.as_dict()}
            save(done, info)


if __name__ == "__main__":
    main()

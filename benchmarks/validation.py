"""What validation costs: step time with and without it, the same run side by side.

``python benchmarks/validation.py [--steps N] [--interval E] [--iters I] [--rounds R]`` launches
the demo through ``python -m launch`` (2 CPU ranks; any extra ``key=value`` is passed on),
alternately with validation off and on (``train.eval_interval=E``, ``train.eval_iters=I``),
``R`` times each, in one scratch folder so both read the same demo data. From each run's
``metrics.jsonl``: the mean training step (``step_time_s``), the mean pass (``val/time_s``) and
the effective step time with validation, (steps' time + passes' time) / steps. Prints a table and
writes benchmarks/results/validation_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def _run(work: Path, name: str, overrides: list[str]) -> list[dict]:
    command = [sys.executable, "-m", "launch", f"name={name}", *overrides]
    result = subprocess.run(command, cwd=work, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    rows = []
    for path in (work / "runs" / name / "launches").glob("*/metrics.jsonl"):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def _measure(rows: list[dict]) -> dict:
    steps = [r["step_time_s"] for r in rows[1:]]  # the first step warms up
    passes = [r["val/time_s"] for r in rows if "val/time_s" in r]
    return {"step_s": statistics.mean(steps), "passes": len(passes),
            "pass_s": statistics.mean(passes) if passes else 0.0,
            "effective_step_s": (sum(steps) + sum(passes)) / len(steps)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--interval", type=int, default=20)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args, extra = parser.parse_known_args(argv)
    common = [f"train.steps={args.steps}", "train.warmup_steps=1", "checkpoint.save_interval=0",
              "checkpoint.save_on_exit=false", *extra]
    off_args = ["train.eval_interval=0", "train.eval_iters=0"]
    on_args = [f"train.eval_interval={args.interval}", f"train.eval_iters={args.iters}"]
    measured: dict[str, list[dict]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(args.rounds):  # alternate, so a busy machine slows both alike
            for mode, mode_args in (("off", off_args), ("on", on_args)):
                measured[mode].append(_measure(_run(Path(scratch), f"{mode}{i}",
                                                    common + mode_args)))
    off = statistics.mean(m["step_s"] for m in measured["off"])
    on_train = statistics.mean(m["step_s"] for m in measured["on"])
    on_eff = statistics.mean(m["effective_step_s"] for m in measured["on"])
    pass_s = statistics.mean(m["pass_s"] for m in measured["on"])
    print(f"{'validation':<40} {'step ms':>10} {'ratio':>8}")
    print(f"{'off':<40} {off * 1000:>10.1f} {1.0:>8.3f}")
    print(f"{'on: training steps alone':<40} {on_train * 1000:>10.1f} {on_train / off:>8.3f}")
    print(f"{f'on: with a pass every {args.interval} steps':<40} {on_eff * 1000:>10.1f} "
          f"{on_eff / off:>8.3f}")
    print(f"one pass ({args.iters} global batches per source): {pass_s * 1000:.1f} ms "
          f"= {pass_s / off:.2f} training steps")
    RESULTS.mkdir(exist_ok=True)
    out = {"args": vars(args), "extra": extra, "step_s_off": off, "step_s_on_training": on_train,
           "step_s_on_effective": on_eff, "pass_s": pass_s, "ratio": on_eff / off,
           "runs": measured}
    (RESULTS / "validation_cpu.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

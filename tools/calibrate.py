"""``python -m tools.calibrate [--out FILE] FOLDER...``: fit the planner to probe runs.

Reads each probe's ``probe.json`` (``train=probe`` runs; a folder is one run folder or a sweep
folder holding several) and its ``config.yaml``, fits ``launch.planning.calibration``, prints
the fit with each probe's residual and writes the calibration file that
``cluster.calibration=<file>`` gives the planner, the launcher and ``tools.schedule``.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

from launch.calibration_file import hardware_of, write_calibration
from launch.config import load
from launch.planning.calibration import PARTS, Fit, Probe, fit
from launch.planning.flops import GPU_PEAK_BF16_TFLOPS
from launch.schema import RUN_CONFIG, Layout
from megatron_ext.probe import PROBE_FILE
from tools.report import refuse

USAGE = """usage: python -m tools.calibrate [--out FILE] FOLDER [FOLDER ...]

Fit the planner's compute, communication and fixed-cost rates to the step times probe runs
measured (python -m launch train=probe ...; -m sweeps over layouts or cluster.nodes), print
the fit and its residuals, and write FILE (default: calibration.json in the first FOLDER).
Each FOLDER is a probe's run folder or a folder holding several (a sweep). Then:
  python -m tools.schedule cluster.calibration=FILE ...    (and python -m launch, tools.planner)

options:
  --out FILE  where to write the calibration
  -h, --help  print this and exit"""


def probe_folders(folders: list[str]) -> list[Path]:
    """Every folder holding a ``probe.json`` at or under ``folders``, in order."""
    found: list[Path] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            refuse([f"error: {folder} is not a folder; give probe run folders or a sweep folder"])
        runs = sorted({p.parent for p in folder.rglob(PROBE_FILE)})
        if not runs:
            refuse([f"error: {folder} holds no {PROBE_FILE}; probe first: python -m launch "
                    "train=probe [-m parallel=...] (a probe writes it after its last step)"])
        found += [run for run in runs if run not in found]
    return found


def read_probe(run: Path) -> Probe:
    """The probe of one run folder: its config, layout and measured step time."""
    record = json.loads((run / PROBE_FILE).read_text())
    name = os.path.relpath(run)
    return Probe(name=str(run) if name.startswith("..") else name, cfg=load(run / RUN_CONFIG), layout=Layout(**record["layout"]),
                 step_time_s=float(record["step_time_s"]), device=record["device"])


def fit_table(probes: list[Probe], result: Fit) -> str:
    """The fitted rates, the factors over nominal, and each probe measured vs predicted."""
    c, rates = probes[0].cfg.cluster, result.calibration
    on_cpu = probes[0].device == "cpu"
    peak = GPU_PEAK_BF16_TFLOPS[c.gpu]
    efficiency = "" if on_cpu else f" ({rates.compute_tflops / peak:.1%} of {c.gpu}'s {peak:g})"
    lines = [f"fitted to {len(probes)} probes on {'CPU ranks' if on_cpu else c.gpu} "
             f"({c.gpus_per_node} per node, interconnect {c.interconnect}):",
             f"  compute      {rates.compute_tflops:.4g} TFLOP/s per rank{efficiency}",
             f"  bandwidth    {rates.link_gb_s:.4g} GB/s inside a node, "
             f"{rates.internode_gb_s:.4g} GB/s across nodes",
             f"  fixed costs  {rates.latency_s * 1e6:.4g} us per transfer, "
             f"{rates.layer_overhead_s * 1e6:.4g} us per layer and micro-batch",
             "  time over nominal: " + ", ".join(
                 f"{part} x{k:.3g}" if ok else f"{part} not determined (nominal)"
                 for part, k, ok in zip(PARTS, result.factors, result.fitted))]
    lines += ["", f"{'layout':<36} {'mbs':>3} {'measured':>9} {'predicted':>9} {'error':>7}"
                  "  run folder"]
    for p, measured, predicted, error in zip(probes, result.measured_s, result.predicted_s,
                                             result.residuals):
        lines.append(f"{p.layout.describe():<36} {p.cfg.train.micro_batch_size:>3} "
                     f"{measured:>8.4f}s {predicted:>8.4f}s {error:>+7.1%}  {p.name}")
    rms = math.sqrt(sum(e * e for e in result.residuals) / len(probes))
    return "\n".join(lines + [f"rms error {rms:.1%}"])


def details(probes: list[Probe], result: Fit) -> dict:
    """The fit, for people reading the file: factors and each probe's residual."""
    return {"factors": dict(zip(PARTS, result.factors)),
            "fitted": dict(zip(PARTS, result.fitted)),
            "probes": [{"run": p.name, "layout": p.layout.describe(),
                        "micro_batch_size": p.cfg.train.micro_batch_size, "measured_s": m,
                        "predicted_s": q, "error": e}
                       for p, m, q, e in zip(probes, result.measured_s, result.predicted_s,
                                             result.residuals)]}


def main(argv: Optional[list[str]] = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or "-h" in args or "--help" in args:
        print(USAGE)
        sys.exit(0 if args else 2)
    out: Optional[Path] = None
    if "--out" in args:
        at = args.index("--out")
        if at + 1 >= len(args):
            refuse(["error: --out needs a file name"])
        out, args = Path(args[at + 1]), args[:at] + args[at + 2:]
    unknown = [a for a in args if a.startswith("-")]
    if unknown:
        refuse([f"error: unknown option {unknown[0]}; the options are --out and --help"])
    probes = [read_probe(run) for run in probe_folders(args)]
    try:
        result = fit(probes)
    except ValueError as err:
        refuse([f"error: {err}"])
    out = out or Path(args[0]) / "calibration.json"
    hardware = {**hardware_of(probes[0].cfg.cluster), "cpu_ranks": probes[0].device == "cpu"}
    write_calibration(out, result.calibration, hardware, details(probes, result))
    print(fit_table(probes, result))
    print(f"\nwrote {out}; use it with cluster.calibration={out}")


if __name__ == "__main__":
    main()

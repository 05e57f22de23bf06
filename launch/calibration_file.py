"""The calibration file ``python -m tools.calibrate`` writes and ``cluster.calibration`` names.

JSON: ``calibration`` holds the rates that fill ``cluster.calibrated`` (``Calibration``'s
fields), ``hardware`` what they were measured on, and the rest (the fit's factors, the probes
with their measured and predicted step times) is for people. Read on the login node when the
config is composed (``with_calibration``), so the planner stays a pure function of the config
and the config.yaml of a run records the rates it was planned with.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from launch.cluster_schema import Calibration, ClusterConfig
from launch.schema import RunConfig

RATES = tuple(f.name for f in dataclasses.fields(Calibration))


def hardware_of(cluster: ClusterConfig) -> dict[str, Any]:
    """What a calibration is valid for: the same GPU type, interconnect and kind of rank."""
    return {"gpu": cluster.gpu, "interconnect": cluster.interconnect,
            "cpu_ranks": cluster.cpu_ranks}


def read_calibration(path: str, cluster: ClusterConfig) -> tuple[Calibration, list[str]]:
    """The rates in ``path`` and the problems with it for ``cluster`` (one line each)."""
    key = f"cluster.calibration={path}"
    try:
        data = json.loads(Path(path).read_text())
        rates = data["calibration"]
        calibration = Calibration(**{name: float(rates[name]) for name in RATES})
    except OSError as err:
        return Calibration(), [f"{key}: cannot read it ({err.strerror}); give a file written "
                               "by python -m tools.calibrate, or '' for the nominal rates"]
    except (ValueError, KeyError, TypeError) as err:
        return Calibration(), [f"{key} is not a calibration file written by python -m "
                               f"tools.calibrate ({type(err).__name__}: {err}); it needs "
                               f"calibration.{{{', '.join(RATES)}}}"]
    measured_on, here = data.get("hardware", {}), hardware_of(cluster)
    if measured_on != here:
        return calibration, [f"{key} was measured on {measured_on}, not this cluster's "
                             f"{here}; probe this hardware and calibrate again"]
    return calibration, calibration.problems()


def with_calibration(cfg: RunConfig) -> tuple[RunConfig, list[str]]:
    """``cfg`` with ``cluster.calibrated`` read from ``cluster.calibration`` (unchanged when
    that is empty), and the problems with the file."""
    if not cfg.cluster.calibration:
        return cfg, []
    calibration, problems = read_calibration(cfg.cluster.calibration, cfg.cluster)
    if problems:
        return cfg, problems
    cluster = dataclasses.replace(cfg.cluster, calibrated=calibration)
    return dataclasses.replace(cfg, cluster=cluster), []


def write_calibration(path: Path, calibration: Calibration, hardware: dict[str, Any],
                      details: dict[str, Any]) -> None:
    """The file ``read_calibration`` reads: the rates, the ``hardware_of`` the probes, then
    ``details``."""
    record = {"calibration": dataclasses.asdict(calibration), "hardware": hardware,
              **details}
    path.write_text(json.dumps(record, indent=1) + "\n")

"""Fit the planner's step-time model to measured probe runs (``python -m tools.calibrate``).

The model (``planner.step_time``) is a sum of three kinds of time, each inversely or directly
proportional to one group of ``Hardware`` rates: math (FLOPs / achieved FLOP/s), transfers
(bytes / bandwidth, NVLink and the node network alike) and fixed costs (collective latency and
per-layer kernel launches). So a probe's step time is ``k_c C + k_b B + k_o O``, where C, B and
O are the three parts at the nominal rates of the probe's cluster and the factors k say how
much slower than nominal each is. The factors are a non-negative least-squares fit of the
probes' relative errors (scipy's NNLS), so one slow probe of a dozen does not dominate.
A part no probe exercises (transfers on one rank) stays at its nominal rate: its factor is
kept at 1 and said so. The calibrated rates are then nominal / k (math, bandwidth) and nominal
x k (latency, launches), written as ``cluster.calibrated``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from launch.cluster_schema import Calibration, ClusterConfig
from launch.planning.planner import Hardware, step_time
from launch.schema import Layout, RunConfig

PARTS = ("compute", "transfers", "fixed costs")


@dataclass(frozen=True)
class Probe:
    """One measured run: its config (layout explicit), layout, median steady step time and
    whether its ranks ran on ``gpu`` or ``cpu`` (``probe.json``)."""

    name: str
    cfg: RunConfig
    layout: Layout
    step_time_s: float
    device: str


@dataclass(frozen=True)
class Fit:
    calibration: Calibration
    factors: tuple[float, float, float]
    """Measured over nominal time of each of ``PARTS``."""
    fitted: tuple[bool, bool, bool]
    """Whether the probes determined each factor (else it is 1: the nominal rate)."""
    measured_s: tuple[float, ...]
    predicted_s: tuple[float, ...]
    """Each probe's step time predicted with ``calibration``, in the order given."""

    @property
    def residuals(self) -> list[float]:
        """Relative errors of the predictions (predicted / measured - 1), one per probe."""
        return [p / m - 1 for p, m in zip(self.predicted_s, self.measured_s)]


def nominal_hardware(cluster: ClusterConfig) -> Hardware:
    """The rates of ``cluster`` before any calibration."""
    return Hardware.for_cluster(dataclasses.replace(cluster, calibrated=Calibration()))


def parts(probe: Probe) -> tuple[float, float, float]:
    """The probe's predicted step time split into ``PARTS`` at nominal rates: each part alone is
    the step time on hardware where the other two cost nothing (the model is linear in them)."""
    hw, inf = nominal_hardware(probe.cfg.cluster), math.inf
    alone = (dataclasses.replace(hw, nvlink_gb_s=inf, internode_gb_s=inf, latency_s=0.0,
                                 layer_overhead_s=0.0),
             dataclasses.replace(hw, achieved_fraction=inf, latency_s=0.0, layer_overhead_s=0.0),
             dataclasses.replace(hw, achieved_fraction=inf, nvlink_gb_s=inf, internode_gb_s=inf))
    t = probe.cfg.train
    return tuple(step_time(probe.cfg, probe.layout, t.micro_batch_size, t.recompute, h)
                 for h in alone)  # type: ignore[return-value]


def hardware_problems(probes: list[Probe]) -> list[str]:
    """Probes of one calibration must share GPU type, ranks per node and interconnect."""
    kinds = {(p.cfg.cluster.gpu, p.cfg.cluster.gpus_per_node, p.cfg.cluster.interconnect,
              p.device) for p in probes}
    if len(kinds) > 1:
        return ["the probes ran on different hardware (cluster.gpu, gpus_per_node, "
                f"interconnect, device): {sorted(kinds)}; calibrate each kind on its own"]
    return []


def _factors(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NNLS of ``matrix`` (rows: probes' parts over their measured times) against ones; parts
    no probe has, or that the fit drops (factor 0), are kept nominal (factor 1, not fitted)."""
    free = matrix.max(axis=0) > 0
    while True:
        factors = np.ones(matrix.shape[1])
        target = 1.0 - matrix[:, ~free].sum(axis=1)
        scale = np.linalg.norm(matrix[:, free], axis=0)
        solved, _ = nnls(matrix[:, free] / scale, target)
        factors[free] = solved / scale
        dropped = free & (factors <= 0)
        if not dropped.any():
            return factors, free
        free &= ~dropped


def fit(probes: list[Probe]) -> Fit:
    """The calibration of ``probes``' hardware that best predicts their step times (module
    docstring). Raises ValueError when the probes cannot determine the compute rate."""
    if not probes:
        raise ValueError("no probes to calibrate from")
    problems = hardware_problems(probes)
    if problems:
        raise ValueError(problems[0])
    split = np.array([parts(p) for p in probes])
    measured = np.array([p.step_time_s for p in probes])
    factors, fitted = _factors(split / measured[:, None])
    if not fitted[0]:
        raise ValueError("the probes do not determine the compute rate (the fit explains their "
                         "step times without math); probe a larger model or batch")
    hw = nominal_hardware(probes[0].cfg.cluster)
    k_c, k_b, k_o = factors
    calibration = Calibration(
        compute_tflops=float(hw.peak_flops * hw.achieved_fraction / k_c / 1e12),
        link_gb_s=float(hw.nvlink_gb_s / k_b), internode_gb_s=float(hw.internode_gb_s / k_b),
        latency_s=float(hw.latency_s * k_o), layer_overhead_s=float(hw.layer_overhead_s * k_o))
    predicted = tuple(float(split[i] @ factors) for i in range(len(probes)))
    return Fit(calibration, tuple(map(float, factors)),  # type: ignore[arg-type]
               tuple(map(bool, fitted)), tuple(map(float, measured)), predicted)  # type: ignore[arg-type]

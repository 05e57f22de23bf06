"""The hardware rates the planner's step-time model runs on: GPU peak, NVLink and network
bandwidth per GPU, and what probe runs measured in their place (``cluster.calibrated``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from launch.cluster_schema import Calibration
from launch.schema import ClusterConfig, RunConfig, runs_local_spec
from launch.planning.flops import GPU_PEAK_BF16_TFLOPS


NVLINK_BUS_GB_S = {"A100": 240.0, "H100": 360.0, "H200": 360.0, "B200": 720.0}
"""NCCL bus bandwidth per GPU inside a node, GB/s: 80% of the NVLink's one-way rate, which
nccl-tests' all-gather/reduce-scatter reach on NVSwitch nodes. NVIDIA data sheets: A100 SXM
NVLink 3, 600 GB/s both ways (300 one way; nccl-tests measure 230-250 GB/s busbw on 8 x A100);
H100 and H200 SXM NVLink 4, 900 GB/s (450); B200 NVLink 5, 1.8 TB/s (900)."""
TUNED_FRACTION = 0.62
"""Share of peak the matrix math reaches with NVIDIA's tuned recipe (``tuned_recipe``).
Calibrated on NVIDIA's published Llama 3.1 8B bf16 rows (shared/data/published_h100.md, from
github.com/NVIDIA/dgxc-benchmarking v24.11.1 and v25.04.01: TP1 PP1 CP2, seq 8192, 8-128 H100,
59.4-62.5% MFU counted as ``flops_per_token`` counts): their MFU, with communication modelled
apart; tests/unit/test_step_time_calibration.py holds every row within 15%."""
NODE_NETWORK_GBIT_S = {
    ("efa", "A100"): 400, ("efa", "H100"): 3200, ("efa", "H200"): 3200, ("efa", "B200"): 3200,
    ("none", "A100"): 1600, ("none", "H100"): 3200, ("none", "H200"): 3200, ("none", "B200"): 3200,
}
"""Inter-node bandwidth of one node, Gb/s, by ``cluster.interconnect`` and ``cluster.gpu``.
efa: the AWS instance with 8 of those GPUs (AWS's instance-type pages): p4d.24xlarge 400 Gb/s
(4 EFA), p5.48xlarge 3,200 (32 EFA), p5e/p5en.48xlarge 3,200, p6-b200.48xlarge 3,200 (EFAv4).
none (any Slurm site): NVIDIA's DGX reference fabric, one InfiniBand port per GPU: HDR 200 Gb/s
on DGX A100, NDR 400 Gb/s on DGX H100/H200/B200."""


@dataclass(frozen=True)
class Hardware:
    """What the step-time model needs to know about the GPUs and their links."""

    gpu: str
    nvlink_gb_s: float
    """NCCL bus bandwidth per GPU inside a node (``NVLINK_BUS_GB_S``)."""
    internode_gb_s: float
    """Per GPU across nodes: the node's network shared by its GPUs (p5: 3,200 Gb/s / 8 = 50 GB/s,
    p4d: 400 Gb/s / 8 = 6.25 GB/s)."""
    achieved_fraction: float = 0.45
    """Share of peak the matrix math reaches: 430-490 of 989 TFLOP/s measured for a 1.5B Llama
    with the TE spec on one H100 (ARCHITECTURE.md); assumed for every GPU type until measured.
    Communication and bubble are modelled apart."""
    latency_s: float = 20e-6
    """Fixed cost of one NCCL collective or p2p transfer (small-message latency)."""
    layer_overhead_s: float = 100e-6
    """Kernel launches of one layer's forward and backward for one micro-batch (~40 kernels
    of a few microseconds); what makes tiny micro-batches and deep pipelines cost something."""

    @classmethod
    def for_cluster(cls, cluster: ClusterConfig) -> "Hardware":
        """The one place GPU type and interconnect become rates (``cluster.gpu``,
        ``cluster.interconnect``, ``cluster.gpus_per_node``)."""
        network = NODE_NETWORK_GBIT_S[(cluster.interconnect, cluster.gpu)]
        nominal = cls(gpu=cluster.gpu, nvlink_gb_s=NVLINK_BUS_GB_S[cluster.gpu],
                      internode_gb_s=network / 8 / cluster.gpus_per_node)
        return nominal.calibrated(cluster.calibrated)

    def calibrated(self, fit: Calibration) -> "Hardware":
        """These rates with those probe runs measured (``cluster.calibrated``, written by
        ``python -m tools.calibrate``) in place of the nominal ones; a 0 keeps the nominal."""
        measured = {"achieved_fraction": fit.compute_tflops * 1e12 / self.peak_flops,
                    "nvlink_gb_s": fit.link_gb_s, "internode_gb_s": fit.internode_gb_s,
                    "latency_s": fit.latency_s, "layer_overhead_s": fit.layer_overhead_s}
        return dataclasses.replace(self, **{k: v for k, v in measured.items() if v})

    @classmethod
    def for_config(cls, cfg: RunConfig) -> "Hardware":
        """``for_cluster``, at ``TUNED_FRACTION`` when the ranks run NVIDIA's tuned kernels,
        unless probe runs measured the compute rate (``cluster.calibrated``)."""
        hw = cls.for_cluster(cfg.cluster)
        if tuned_recipe(cfg) and not cfg.cluster.calibrated.compute_tflops:
            return dataclasses.replace(hw, achieved_fraction=TUNED_FRACTION)
        return hw

    @property
    def peak_flops(self) -> float:
        return GPU_PEAK_BF16_TFLOPS[self.gpu] * 1e12


def tuned_recipe(cfg: RunConfig) -> bool:
    """Transformer Engine ranks with the fusions NVIDIA's recipes use (conf/recipe/nvidia.yaml)."""
    k = cfg.kernels
    return (not runs_local_spec(cfg) and k.bias_activation_fusion and k.apply_rope_fusion
            and k.cross_entropy_loss_fusion and k.gradient_accumulation_fusion)

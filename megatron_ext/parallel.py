"""The only module that touches megatron's ``parallel_state``: process groups and rank queries."""
from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from launch.schema import Layout
from megatron_ext.env import RunEnv

log = logging.getLogger("megatron_ext.parallel")


def init(layout: Layout, env: RunEnv, *, seed: int, timeout_s: float, use_gpu: bool) -> None:
    """Join the job and build TP/PP/CP/DP groups; a dead peer errors after ``timeout_s``."""
    if layout.world_size != env.world_size:
        raise RuntimeError(f"layout {layout.describe()} needs {layout.world_size} ranks, "
                           f"the job has {env.world_size}")
    env.export()
    if use_gpu:
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend="nccl" if use_gpu else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d of %d (local rank %d) on node %s joined through %s:%d", env.rank,
             env.world_size, env.local_rank, env.node, env.master_addr, env.master_port)
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        context_parallel_size=layout.cp, distributed_timeout_minutes=max(1, int(timeout_s // 60)))
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def is_first_stage(vp_stage: int | None = None) -> bool:
    return ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)


def is_last_stage(vp_stage: int | None = None) -> bool:
    return ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)


def pp_rank() -> int:
    return ps.get_pipeline_model_parallel_rank()


def dp_rank() -> int:
    return ps.get_data_parallel_rank()


def dp_group() -> dist.ProcessGroup:
    return ps.get_data_parallel_group()


def cp_group() -> dist.ProcessGroup:
    return ps.get_context_parallel_group()


def reports_loss() -> bool:
    """The last stage's TP rank 0 of each data-parallel replica and CP rank holds its share of
    each micro-batch's loss: its tokens' sum and count (CP ranks hold disjoint tokens)."""
    return is_last_stage() and ps.get_tensor_model_parallel_rank() == 0


def reads_for_replica() -> bool:
    """The first stage's TP and CP rank 0: one rank per data-parallel replica that reads every
    sample of the replica's share of each micro-batch whole (the others read it too, or not)."""
    return (is_first_stage() and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0)


def shutdown() -> None:
    if dist.is_initialized():
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1

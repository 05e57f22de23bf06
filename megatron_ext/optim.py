"""Wrap the model chunks in megatron's DDP and build its (distributed) optimizer and lr schedule.

The communication overlap options (``parallel.overlap_grad_reduce``, ``overlap_param_gather``)
reach megatron's ``DistributedDataParallelConfig`` and ``OptimizerConfig`` here and nowhere
else; the schedule learns to launch reductions per chunk through ``TransformerConfig``.
"""
from __future__ import annotations

from collections.abc import Callable

from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig

from launch.schema import RunConfig


def ddp_config(cfg: RunConfig) -> DistributedDataParallelConfig:
    """Gradient buffers in fp32 or, ``optimizer.grad_reduce_in_fp32=false`` (NVIDIA's recipe),
    in the parameters' bf16; overlap as ``parallel`` asks."""
    p = cfg.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.optimizer.grad_reduce_in_fp32, overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=cfg.optimizer.distributed, check_for_nan_in_grad=False)


def wrap_ddp(chunks: list[GPTModel], config: TransformerConfig,
             cfg: RunConfig) -> list[DistributedDataParallel]:
    ddp = ddp_config(cfg)
    # Only the first chunk buckets its gradients, as in Megatron-LM's training loop.
    return [DistributedDataParallel(config=config, ddp_config=ddp, module=chunk,
                                    disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]


def optimizer_config(config: TransformerConfig, cfg: RunConfig) -> OptimizerConfig:
    """Adam as ``optimizer`` describes; ``overlap_param_gather`` must match the DDP config's."""
    o, t = cfg.optimizer, cfg.train
    return OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=config.bf16, params_dtype=config.params_dtype,
        use_distributed_optimizer=o.distributed,
        overlap_param_gather=cfg.parallel.overlap_param_gather)


def _per_chunk(funcs: list[Callable]) -> Callable | list[Callable]:
    """The schedule takes one callable for a single chunk, a list for virtual stages."""
    return funcs[0] if len(funcs) == 1 else funcs


def lr_scheduler(optimizer: MegatronOptimizer, cfg: RunConfig) -> OptimizerParamScheduler:
    """Warmup then decay over ``train.steps``; on resume, ``train.lr_schedule_on_resume`` says
    whose schedule wins when it differs from the checkpoint's: "error" (neither flag) makes
    megatron assert they match (the launcher refuses that case first, naming the fields)."""
    o, t = cfg.optimizer, cfg.train
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=t.steps, lr_decay_style=t.lr_decay_style, start_wd=o.weight_decay,
        end_wd=o.weight_decay, wd_incr_steps=t.steps, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=t.lr_schedule_on_resume == "checkpoint",
        override_opt_param_scheduler=t.lr_schedule_on_resume == "config")


def build_optimizer(model: list[DistributedDataParallel], config: TransformerConfig,
                    cfg: RunConfig) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    optimizer = get_megatron_optimizer(optimizer_config(config, cfg), model)
    scheduler = lr_scheduler(optimizer, cfg)
    # The schedule calls these between micro-batches and after the last backward.
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = _per_chunk([chunk.no_sync for chunk in model])
    if cfg.parallel.overlap_grad_reduce:
        # As Megatron-LM (align_grad_reduce): the interleaved schedule starts each chunk's
        # reduction after its last backward, at the same time on every pipeline stage.
        config.grad_sync_func = _per_chunk([chunk.start_grad_sync for chunk in model])
    return optimizer, scheduler

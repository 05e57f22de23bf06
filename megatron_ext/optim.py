"""Wrap the model chunks in megatron's DDP and build its (distributed) optimizer and lr schedule."""
from __future__ import annotations

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


def wrap_ddp(chunks: list[GPTModel], config: TransformerConfig,
             cfg: RunConfig) -> list[DistributedDataParallel]:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.optimizer.distributed, check_for_nan_in_grad=False)
    # Only the first chunk buckets its gradients, as in Megatron-LM's training loop.
    return [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]


def build_optimizer(model: list[DistributedDataParallel], config: TransformerConfig,
                    cfg: RunConfig) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    o, t = cfg.optimizer, cfg.train
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=o.weight_decay,
                        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                        clip_grad=o.clip_grad, bf16=config.bf16, params_dtype=config.params_dtype,
                        use_distributed_optimizer=o.distributed),
        model)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=t.steps, lr_decay_style=t.lr_decay_style, start_wd=o.weight_decay,
        end_wd=o.weight_decay, wd_incr_steps=t.steps, wd_incr_style="constant")
    # The schedule calls these between micro-batches and after the last backward.
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [chunk.no_sync for chunk in model]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return optimizer, scheduler

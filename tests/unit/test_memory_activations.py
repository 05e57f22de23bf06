"""The activation term of the memory predictor (launch.planning.memory) against what megatron-core really saves, measured on CPU.

A rank's GPTModel, built by the trainer's own ``build_model`` (local spec, whose unfused attention
materialises the scores; fp32, as CPU ranks compute), runs one forward pass with the loss under
``torch.autograd.graph.saved_tensors_hooks``. The distinct storages it saves for backward,
parameters excluded, are exactly the activations the backward pass will read: the quantity
``saved_activation_bytes`` predicts for one micro-batch on a single pipeline stage.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from launch.schema import KernelsConfig, Layout, ModelConfig, RunConfig, TrainConfig
from tests.conftest import make_config
from tests.unit.megatron_forward import cpu_rank, free_port
from launch.planning.memory import saved_activation_bytes
from launch.planning.planner import kv_exchange_bytes

ONE_RANK = Layout(tp=1, pp=1, cp=1, dp=1)
TOLERANCE = 1e-3
"""Relative error allowed. The count is exact but for the 4-byte attention-mask-type tensor that
megatron's selective recomputation saves per layer."""


@dataclasses.dataclass(frozen=True)
class Case:
    hidden: int
    heads: int
    groups: int
    ffn: int
    layers: int
    seq: int
    mbs: int
    recompute: str
    recompute_num_layers: int = 1
    fused: bool = False
    """megatron's fused SwiGLU (``kernels.bias_activation_fusion``), which CPU ranks run."""

    def describe(self) -> str:
        return (f"h={self.hidden} a={self.heads} g={self.groups} f={self.ffn} L={self.layers} "
                f"s={self.seq} b={self.mbs} {self.recompute}"
                + (f"/{self.recompute_num_layers}" if self.recompute == "full" else "")
                + (" fused" if self.fused else ""))

    def config(self) -> RunConfig:
        return make_config(
            "model=tiny", "model.transformer_impl=local", "model.attention_backend=unfused",
            f"model.hidden_size={self.hidden}", f"model.num_attention_heads={self.heads}",
            f"model.num_query_groups={self.groups}", f"model.ffn_hidden_size={self.ffn}",
            f"model.num_layers={self.layers}", "train.precision=fp32",
            f"train.seq_length={self.seq}", f"train.micro_batch_size={self.mbs}",
            f"train.global_batch_size={self.mbs}", f"train.recompute={self.recompute}",
            f"train.recompute_num_layers={self.recompute_num_layers}",
            "cluster.gpus_per_node=1",
            *(["kernels.bias_activation_fusion=true"] if self.fused else []))


CASES = (
    Case(64, 4, 2, 160, 2, 32, 1, "none"),
    Case(128, 8, 2, 352, 2, 128, 2, "none"),
    Case(128, 4, 4, 352, 2, 64, 1, "none"),         # MHA: K and V are not expanded
    Case(256, 8, 2, 704, 2, 256, 1, "none"),
    Case(64, 4, 2, 160, 2, 512, 4, "none"),         # the s^2 scores dominate
    Case(128, 8, 2, 352, 2, 128, 2, "selective"),
    Case(128, 4, 4, 352, 2, 64, 1, "selective"),
    Case(256, 8, 2, 704, 2, 256, 4, "selective"),
    Case(128, 8, 2, 352, 4, 128, 2, "full"),
    Case(256, 8, 2, 704, 4, 64, 4, "full", recompute_num_layers=2),
    Case(64, 4, 2, 160, 4, 32, 1, "full", recompute_num_layers=4),
    Case(128, 8, 2, 352, 2, 128, 2, "none", fused=True),
    Case(256, 8, 2, 704, 2, 256, 4, "selective", fused=True),
)


def _saved_bytes(runs: list[tuple[ModelConfig, TrainConfig, KernelsConfig]], port: int,
                 rank: int = 0,
                 cp: int = 1) -> list[tuple[int, int]]:
    """In a fresh process (CP rank ``rank`` of ``cp``): build each model and sum what its
    forward over this rank's chunks saves, and the K/V bytes its attention received from peers."""
    import torch
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_ext import cp_attention, parallel
    from megatron_ext.model import build_model

    received = [0]
    gather = cp_attention.dist.all_gather

    def counted_gather(parts: list[torch.Tensor], local: torch.Tensor, group) -> None:
        received[0] += (len(parts) - 1) * local.nbytes  # from every peer, in forward
        gather(parts, local, group=group)

    cp_attention.dist.all_gather = counted_gather
    out = []
    with cpu_rank(rank, cp, port, threads=2 // cp, cp=cp) as layout:
        for model_cfg, train_cfg, kernels in runs:
            chunks, _ = build_model(model_cfg, train_cfg, layout, False, kernels=kernels)
            model = chunks[0]
            weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
            saved: dict[int, int] = {}

            def pack(tensor: torch.Tensor) -> torch.Tensor:
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in weights:
                    saved[storage.data_ptr()] = storage.nbytes()
                return tensor

            b, s = train_cfg.micro_batch_size, train_cfg.seq_length
            tokens = torch.randint(0, model_cfg.vocab_size, (b, s),
                                   generator=torch.Generator().manual_seed(0))
            batch = get_batch_on_this_cp_rank(
                {"tokens": tokens, "positions": torch.arange(s).expand(b, s).contiguous()},
                parallel.cp_group())
            received[0] = 0
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = model(batch["tokens"], batch["positions"], None, labels=batch["tokens"])
            out.append((sum(saved.values()), received[0]))
            del loss
    return out


def test_saved_activations_match_megatron_core_on_cpu() -> None:
    configs = [case.config() for case in CASES]
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        measured = pool.submit(_saved_bytes, [(c.model, c.train, c.kernels) for c in configs],
                               free_port()).result(timeout=240)
    errors = []
    print(f"\n{'case':<46} {'measured B':>11} {'predicted B':>11} {'error':>9}")
    for case, cfg, (bytes_, _) in zip(CASES, configs, measured):
        predicted = saved_activation_bytes(cfg, ONE_RANK, case.mbs, case.recompute,
                                           first=True, last=True)
        errors.append((predicted - bytes_) / bytes_)
        print(f"{case.describe():<46} {bytes_:>11,} {predicted:>11,.0f} {errors[-1]:>+9.2e}")
    assert max(abs(e) for e in errors) < TOLERANCE


CP_CASES = (
    Case(64, 4, 2, 160, 2, 32, 1, "none"),
    Case(128, 4, 4, 352, 2, 64, 2, "none"),         # MHA
    Case(128, 8, 2, 352, 4, 128, 1, "full", recompute_num_layers=2),
)


def test_activations_per_context_parallel_rank_and_the_kv_exchange_match_on_cpu() -> None:
    """CP=2 on two CPU ranks: each rank saves the activations of its s/2 tokens (the CPU
    attention's gathered K, V and scores over all s keys), and its attention receives the
    peer's K and V, ``kv_exchange_bytes`` per layer: the planner's CP step-time input."""
    cp_layout = Layout(tp=1, pp=1, cp=2, dp=1)
    configs = [case.config() for case in CP_CASES]
    port = free_port()
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        ranks = [pool.submit(_saved_bytes, [(c.model, c.train, c.kernels) for c in configs], port, rank, 2)
                 for rank in range(2)]
        measured = [rank.result(timeout=240) for rank in ranks]
    assert measured[0] == measured[1]  # load-balanced chunks: both ranks hold the same
    for case, cfg, (bytes_, received) in zip(CP_CASES, configs, measured[0]):
        predicted = saved_activation_bytes(cfg, cp_layout, case.mbs, case.recompute,
                                           first=True, last=True)
        assert abs(predicted - bytes_) / bytes_ < TOLERANCE, (case.describe(), bytes_, predicted)
        assert received == case.layers * kv_exchange_bytes(cfg, cp_layout, case.mbs), case

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

from launch.schema import Layout, ModelConfig, RunConfig, TrainConfig
from tests.conftest import make_config
from tests.unit.megatron_forward import cpu_rank, free_port
from launch.planning.memory import saved_activation_bytes

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

    def describe(self) -> str:
        return (f"h={self.hidden} a={self.heads} g={self.groups} f={self.ffn} L={self.layers} "
                f"s={self.seq} b={self.mbs} {self.recompute}"
                + (f"/{self.recompute_num_layers}" if self.recompute == "full" else ""))

    def config(self) -> RunConfig:
        return make_config(
            "model=tiny", "model.transformer_impl=local", "model.attention_backend=unfused",
            f"model.hidden_size={self.hidden}", f"model.num_attention_heads={self.heads}",
            f"model.num_query_groups={self.groups}", f"model.ffn_hidden_size={self.ffn}",
            f"model.num_layers={self.layers}", "train.precision=fp32",
            f"train.seq_length={self.seq}", f"train.micro_batch_size={self.mbs}",
            f"train.global_batch_size={self.mbs}", f"train.recompute={self.recompute}",
            f"train.recompute_num_layers={self.recompute_num_layers}",
            "cluster.gpus_per_node=1")


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
)


def _saved_bytes(runs: list[tuple[ModelConfig, TrainConfig]], port: int) -> list[int]:
    """In a fresh process: build each model on one CPU rank and sum what its forward saves."""
    import torch

    from megatron_ext.model import build_model

    out = []
    with cpu_rank(0, 1, port, threads=2) as layout:
        for model_cfg, train_cfg in runs:
            chunks, _ = build_model(model_cfg, train_cfg, layout, False)
            model = chunks[0]
            weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
            saved: dict[int, int] = {}

            def pack(tensor: torch.Tensor) -> torch.Tensor:
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in weights:
                    saved[storage.data_ptr()] = storage.nbytes()
                return tensor

            b, s = train_cfg.micro_batch_size, train_cfg.seq_length
            tokens = torch.randint(0, model_cfg.vocab_size, (b, s))
            positions = torch.arange(s).expand(b, s)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = model(tokens, positions, None, labels=tokens)
            out.append(sum(saved.values()))
            del loss
    return out


def test_saved_activations_match_megatron_core_on_cpu() -> None:
    configs = [case.config() for case in CASES]
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        measured = pool.submit(_saved_bytes, [(c.model, c.train) for c in configs],
                               free_port()).result(timeout=240)
    errors = []
    print(f"\n{'case':<46} {'measured B':>11} {'predicted B':>11} {'error':>9}")
    for case, cfg, bytes_ in zip(CASES, configs, measured):
        predicted = saved_activation_bytes(cfg, ONE_RANK, case.mbs, case.recompute,
                                           first=True, last=True)
        errors.append((predicted - bytes_) / bytes_)
        print(f"{case.describe():<46} {bytes_:>11,} {predicted:>11,.0f} {errors[-1]:>+9.2e}")
    assert max(abs(e) for e in errors) < TOLERANCE

"""A spawned CPU rank that scores prepared chat data three ways with the trainer's own model.

(1) the trainer's path (``SFTDataset`` samples unpacked, through ``step.forward_step`` and its
loss function); (2) the same, packed; (3) an independent reference: each conversation alone,
no padding, plain ``torch.nn.functional.cross_entropy`` over the positions whose next token is
an answer token. Also (4): the packed sequences without their attention mask, which must differ.
"""
from __future__ import annotations

import numpy
import torch

from tests.unit.megatron_forward import cpu_rank


def _trainer_sums(model, dataset, drop_mask: bool = False) -> tuple[float, int]:
    from megatron_ext.step import forward_step

    total, tokens = 0.0, 0
    for i in range(len(dataset)):
        batch = {k: torch.as_tensor(v).unsqueeze(0) for k, v in dataset[i].items()
                 if not (drop_mask and k == "attention_mask")}
        output, loss_func = forward_step(iter([batch]), model)
        loss_sum, count, _ = loss_func(output)
        total, tokens = total + float(loss_sum), tokens + int(count)
    return total, tokens


def _reference_sums(model, prefix: str) -> tuple[float, int]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs, masks = IndexedDataset(prefix), IndexedDataset(prefix + "_loss_mask")
    total, tokens = 0.0, 0
    for ids, mask in zip(docs, masks):
        ids = torch.as_tensor(numpy.asarray(ids, numpy.int64)).unsqueeze(0)
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        logits = model(ids, positions, None)[0, :-1].float()  # [s - 1, vocab]
        weights = torch.as_tensor(numpy.asarray(mask[1:], numpy.float32))
        per_token = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        total += float((per_token * weights).sum())
        tokens += int(weights.sum())
    return total, tokens


def sft_losses(rank: int, port: int, prefix: str, seq_length: int, pad_id: int, out: str) -> None:
    from launch.schema import ModelConfig, TrainConfig
    from megatron_ext.model import build_model
    from megatron_ext.sft_data import SFTDataset

    model_cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                            num_query_groups=2, ffn_hidden_size=128, vocab_size=512,
                            transformer_impl="local")
    with cpu_rank(rank, 1, port) as layout:
        torch.manual_seed(0)
        chunks, _ = build_model(model_cfg, TrainConfig(precision="fp32"), layout, False)
        model = chunks[0].eval()
        result = {}
        with torch.no_grad():
            for packing in (False, True):
                dataset = SFTDataset(prefix, seq_length=seq_length, packing=packing,
                                     pad_id=pad_id, seed=3, split="1,0,0", part=0)
                result["packed" if packing else "unpacked"] = _trainer_sums(model, dataset)
                result[f"sequences_{'packed' if packing else 'unpacked'}"] = len(dataset)
            result["packed_no_mask"] = _trainer_sums(model, dataset, drop_mask=True)
            result["reference"] = _reference_sums(model, prefix)
        torch.save(result, out)

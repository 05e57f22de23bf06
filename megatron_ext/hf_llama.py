"""Hugging Face Llama weights as megatron-core's layout-independent (global) tensors.

Megatron names a tensor by its ``ShardedTensor`` key (the same for the local and the
Transformer Engine spec). We store one full tensor per key and layer, named
``decoder.layers.<i>.<rest>``; any TP/PP/VPP rank slices its shard out of it with the shard's
global offsets (``megatron_ext.init_from``). Two sources here give these tensors: a Hugging
Face directory (converted on the fly) and a converted directory (``python -m tools.convert_hf
import``); ``megatron_ext.weights`` adds training checkpoints and picks the source. Only torch
and safetensors here: no process group, no megatron.

Layout facts (megatron-core 0.16.1, checked by tests/unit/test_convert_hf.py against
``transformers``' LlamaForCausalLM logits):
- ``linear_qkv.weight`` is grouped by query group: ``[q heads of the group..., k, v]``.
- ``linear_fc1.weight`` is ``[gate; up]`` (SwiGLU); TP shards each half separately.
- RoPE is rotate-half in both (megatron's default ``rotary_interleaved=False``).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

FORMAT = "slurm-llm-global-v1"
META_FILE = "megatron_global.json"
INDEX_FILE = "weights.index.json"
# Files copied between a Hugging Face directory and a converted one, so export is usable.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
LAYER_PREFIX = "decoder.layers."
PADDED_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")
"""Megatron pads these to a multiple of make_vocab_size_divisible_by * TP rows."""


ARCHITECTURE = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "vocab_size", "max_position_embeddings", "rotary_base",
                "rope_scaling_factor", "norm_epsilon", "untie_embeddings_and_output_weights")
"""The ``model.*`` fields that decide the weights' shapes and meaning (``model_fields``)."""


class WeightSource(Protocol):
    folder: Path
    """Where the weights are read from (for a run's checkpoint.dir: the step chosen)."""
    model: dict[str, Any]
    """ModelConfig fields the weights were made for."""

    def tensor(self, key: str) -> torch.Tensor:
        """The full tensor of a megatron key with its layer, e.g. ``decoder.layers.3.mlp...``."""


LLAMA3_ROPE_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
"""What megatron-core's llama3 RoPE scaling fixes; only ``factor`` is configurable."""


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings: ``rope_scaling`` (transformers 4) or ``rope_parameters`` (5)."""
    return hf.get("rope_scaling") or hf.get("rope_parameters") or {}


def rope_scaling(factor: float) -> dict[str, Any] | None:
    """The ``config.json`` ``rope_scaling`` entry for ``model.rope_scaling_factor``."""
    return {"rope_type": "llama3", "factor": factor, **LLAMA3_ROPE_SCALING} if factor else None


def model_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """The ``model.*`` values of a Llama ``config.json`` (both transformers 4 and 5 spellings)."""
    rope = _rope(hf)
    llama3 = rope.get("rope_type", rope.get("type")) == "llama3"
    return {
        "num_layers": hf["num_hidden_layers"], "hidden_size": hf["hidden_size"],
        "num_attention_heads": hf["num_attention_heads"],
        "num_query_groups": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "ffn_hidden_size": hf["intermediate_size"], "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf["max_position_embeddings"],
        "rotary_base": int(hf.get("rope_theta") or rope.get("rope_theta", 10000)),
        "rope_scaling_factor": float(rope["factor"]) if llama3 else 0.0,
        "norm_epsilon": hf["rms_norm_eps"],
        "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", False),
    }


def unsupported(hf: dict[str, Any]) -> list[str]:
    """Llama variants this mapping (and ModelConfig) cannot represent exactly."""
    out = []
    if hf.get("model_type") != "llama":
        out.append(f"model_type={hf.get('model_type')!r}: only 'llama' is supported")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        out.append(f"head_dim={head_dim} is not hidden_size/num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu":
        out.append(f"hidden_act={hf['hidden_act']!r}: only silu (SwiGLU) is supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        out.append("attention_bias/mlp_bias: Llama has no biases; these weights do")
    scaling = _rope(hf)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "llama3"):
        out.append(f"rope_scaling.rope_type={kind!r} is not supported; choose default or llama3 "
                   "(Llama 3.1/3.2)")
    if kind == "llama3":
        out += [f"rope_scaling.{name}={scaling.get(name)!r} is not supported; megatron-core "
                f"fixes it to {value}" for name, value in LLAMA3_ROPE_SCALING.items()
                if scaling.get(name) != value]
    return out


def model_problems(source_model: dict[str, Any], model: Any) -> list[str]:
    """Every ``model.*`` field that differs from what the weights were made for."""
    return [f"model.{name}={getattr(model, name)!r} but the pretrained weights have {value!r}"
            for name, value in source_model.items() if getattr(model, name) != value]


def layer_keys(tied: bool) -> tuple[list[str], list[str]]:
    """Megatron keys outside the layers and the per-layer suffixes."""
    outer = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    if not tied:
        outer.append("output_layer.weight")
    return outer, list(_FROM_HF_LAYER)


def all_keys(model: dict[str, Any]) -> list[str]:
    outer, suffixes = layer_keys(not model["untie_embeddings_and_output_weights"])
    return outer + [f"{LAYER_PREFIX}{i}.{s}" for i in range(model["num_layers"]) for s in suffixes]


# -- fused tensors ----------------------------------------------------------------------------
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF's separate q/k/v projections -> megatron's ``[q..., k, v]`` per query group."""
    hidden = q.shape[1]
    head_dim = k.shape[0] // groups
    q = q.reshape(groups, -1, hidden)  # (groups, heads_per_group * head_dim, hidden)
    k, v = k.reshape(groups, head_dim, hidden), v.reshape(groups, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, ...]:
    """Inverse of ``fuse_qkv``."""
    hidden = qkv.shape[1]
    head_dim = qkv.shape[0] // (heads + 2 * groups)
    per_group = qkv.reshape(groups, (heads // groups + 2) * head_dim, hidden)
    q, k, v = per_group.split([heads // groups * head_dim, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, hidden).clone() for t in (q, k, v))  # own storage: safetensors


# per-layer megatron suffix -> (HF names under model.layers.<i>., how to combine them)
_Combine = Callable[[list[torch.Tensor], dict[str, Any]], torch.Tensor]
_FROM_HF_LAYER: dict[str, tuple[tuple[str, ...], _Combine]] = {
    "self_attention.linear_qkv.layer_norm_weight": (("input_layernorm.weight",), lambda t, m: t[0]),
    "self_attention.linear_qkv.weight": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        lambda t, m: fuse_qkv(*t, groups=m["num_query_groups"])),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), lambda t, m: t[0]),
    "mlp.linear_fc1.layer_norm_weight": (("post_attention_layernorm.weight",), lambda t, m: t[0]),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"),
                              lambda t, m: torch.cat(t, dim=0)),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), lambda t, m: t[0]),
}
_FROM_HF_OUTER = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
                  "decoder.final_layernorm.weight": "model.norm.weight",
                  "output_layer.weight": "lm_head.weight"}


def to_hf(key: str, tensor: torch.Tensor, model: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One megatron tensor -> the Hugging Face tensors it holds."""
    if key in _FROM_HF_OUTER:
        return {_FROM_HF_OUTER[key]: tensor}
    layer, suffix = key[len(LAYER_PREFIX):].split(".", 1)
    names = [f"model.layers.{layer}.{n}" for n in _FROM_HF_LAYER[suffix][0]]
    if suffix == "self_attention.linear_qkv.weight":
        parts = split_qkv(tensor, model["num_attention_heads"], model["num_query_groups"])
    elif suffix == "mlp.linear_fc1.weight":
        parts = tuple(t.clone() for t in tensor.chunk(2, dim=0))
    else:
        parts = (tensor,)
    return dict(zip(names, parts))


def _safetensors_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, from an HF-style index or by listing every safetensors file."""
    from safetensors import safe_open

    index = next((p for p in (folder / "model.safetensors.index.json", folder / INDEX_FILE)
                  if p.is_file()), None)
    if index:
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    out: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: path for k in f.keys()})
    if not out:
        raise FileNotFoundError(f"{folder} has no *.safetensors files")
    return out


def _read(files: dict[str, Path], name: str) -> torch.Tensor:
    from safetensors import safe_open

    if name not in files:
        raise KeyError(f"tensor {name!r} is missing from the checkpoint")
    with safe_open(str(files[name]), framework="pt") as f:
        return f.get_tensor(name)


class HFLlama:
    """A Hugging Face Llama directory (config.json + safetensors), read lazily per tensor."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.hf_config = json.loads((folder / "config.json").read_text())
        problems = unsupported(self.hf_config)
        if problems:
            raise ValueError(f"{folder}: " + "; ".join(problems))
        self.model = model_fields(self.hf_config)
        self._files = _safetensors_map(folder)

    def tensor(self, key: str) -> torch.Tensor:
        if key in _FROM_HF_OUTER:
            return _read(self._files, _FROM_HF_OUTER[key])
        layer, suffix = key[len(LAYER_PREFIX):].split(".", 1)
        names, combine = _FROM_HF_LAYER[suffix]
        return combine([_read(self._files, f"model.layers.{layer}.{n}") for n in names], self.model)


class Converted:
    """A directory written by ``tools.convert_hf import``: megatron keys, full tensors."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{folder / META_FILE}: format {meta.get('format')!r}, "
                             f"expected {FORMAT!r}")
        self.model, self.hf_config = meta["model"], meta.get("hf_config", {})
        self._files = _safetensors_map(folder)

    def tensor(self, key: str) -> torch.Tensor:
        return _read(self._files, key)

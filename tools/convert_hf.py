"""Convert Llama weights between Hugging Face and megatron-core, for any TP/PP layout.

    python -m tools.convert_hf import --hf <hf dir> --out <converted dir> [--tp N --pp N]
    python -m tools.convert_hf export --megatron <converted dir> --out <hf dir>
    python -m tools.convert_hf export --megatron <checkpoint.dir or its step_N> --out <hf dir>

The converted directory holds megatron's global tensors (one safetensors file per layer,
keyed ``decoder.layers.<i>.self_attention.linear_qkv.weight`` ...), so it is independent of
the layout: ``train.init_from=<dir>`` loads it into any TP/PP/VPP/DP run, and ``--tp/--pp``
only check that the model can be split that way. One layer is in memory at a time.
``train.init_from`` also accepts the Hugging Face directory itself (converted while loading).
Export also reads a training run's checkpoints (any layout; model weights only, from the
newest committed step or the one named), with the tokenizer the run trained with.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from megatron_ext.hf_llama import (
    FORMAT,
    INDEX_FILE,
    META_FILE,
    TOKENIZER_FILES,
    HFLlama,
    WeightSource,
    layer_keys,
    rope_scaling,
    to_hf,
)
from megatron_ext.weights import TrainingCheckpoint, open_weights
from launch.parallel_schema import pipeline_splits, split_problems
from launch.schema import Layout, ModelConfig
from launch.tokenizer import load_tokenizer, tokenizer_file


def layout_problems(model: dict[str, Any], tp: int, pp: int) -> list[str]:
    """Why these weights cannot be split over ``tp`` x ``pp`` (megatron's divisibility rules;
    layers that ``pp`` does not divide pass when one of megatron's uneven splits takes them,
    ``launch.parallel_schema.pipeline_splits``: the converted tensors are global either way)."""
    out = ModelConfig(**model).tensor_parallel_problems(tp, field="--tp")
    layers = model["num_layers"]
    if not any(not split_problems(layers, Layout(tp=tp, pp=pp, cp=1, dp=1, **split))
               for split in pipeline_splits(layers, pp)):
        out.append(f"--pp={pp} must divide num_layers={layers}")
    return out


def overrides(model: dict[str, Any]) -> list[str]:
    """The ``model.*`` command-line overrides that build a matching model."""
    return [f"model.{k}={v}" for k, v in model.items()]


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def import_hf(hf_dir: Path, out: Path) -> dict[str, Any]:
    """Write the converted directory; its metadata file, written last, marks it complete."""
    source = HFLlama(hf_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)
    outer, suffixes = layer_keys(not source.model["untie_embeddings_and_output_weights"])
    groups = {"outer.safetensors": outer}
    for i in range(source.model["num_layers"]):
        groups[f"layer_{i:05d}.safetensors"] = [f"decoder.layers.{i}.{s}" for s in suffixes]
    weight_map = {}
    for name, keys in groups.items():
        _save({k: source.tensor(k) for k in keys}, out / name)
        weight_map.update(dict.fromkeys(keys, name))
    (out / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}, indent=1))
    _copy_tokenizer(hf_dir, out)
    meta = {"format": FORMAT, "model": source.model, "hf_config": source.hf_config}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return source.model


def _hf_config(source: WeightSource) -> dict[str, Any]:
    """The original config.json when known, else one built from the model fields."""
    m = source.model
    base = dict(getattr(source, "hf_config", {}) or {})
    return {**base, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "num_hidden_layers": m["num_layers"], "hidden_size": m["hidden_size"],
            "num_attention_heads": m["num_attention_heads"],
            "num_key_value_heads": m["num_query_groups"], "intermediate_size": m["ffn_hidden_size"],
            "vocab_size": m["vocab_size"], "max_position_embeddings": m["max_position_embeddings"],
            "rope_theta": float(m["rotary_base"]),
            "rope_scaling": rope_scaling(m.get("rope_scaling_factor", 0.0)),
            "rms_norm_eps": m["norm_epsilon"],
            "tie_word_embeddings": not m["untie_embeddings_and_output_weights"],
            "hidden_act": "silu"}


def _run_tokenizer(tokenizer: str, out: Path) -> dict[str, Any]:
    """Copy the tokenizer a run trained with; its end-of-document id is the model's eos."""
    if not tokenizer or not Path(tokenizer).exists():
        print(f"convert_hf: no tokenizer copied (the run's data.tokenizer={tokenizer!r} is not "
              "found from here); add tokenizer.json to the export yourself", file=sys.stderr)
        return {}
    path = tokenizer_file(Path(tokenizer))
    _copy_tokenizer(path.parent, out)  # tokenizer_config.json etc. kept beside it
    shutil.copy2(path, out / "tokenizer.json")
    return {"eos_token_id": load_tokenizer(path)[1]}


def export_hf(src: Path, out: Path) -> Path:
    """Write a Hugging Face directory (one safetensors file per layer, with an index).

    ``src``: a converted or Hugging Face directory, a run's ``checkpoint.dir`` or one of its
    ``step_<N>`` folders. Returns the folder the weights were read from.
    """
    source = open_weights(src)
    m = source.model
    out.mkdir(parents=True, exist_ok=True)
    outer, suffixes = layer_keys(not m["untie_embeddings_and_output_weights"])
    groups = [outer] + [[f"decoder.layers.{i}.{s}" for s in suffixes]
                        for i in range(m["num_layers"])]
    weight_map = {}
    for n, keys in enumerate(groups, start=1):
        name = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: v for key in keys for k, v in to_hf(key, source.tensor(key), m).items()}
        _save(tensors, out / name)
        weight_map.update(dict.fromkeys(tensors, name))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config = _hf_config(source)
    if isinstance(source, TrainingCheckpoint):
        config.update(_run_tokenizer(source.tokenizer, out))
    else:
        _copy_tokenizer(src, out)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return source.folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face Llama -> converted megatron directory")
    imp.add_argument("--hf", type=Path, required=True)
    imp.add_argument("--out", type=Path, required=True)
    imp.add_argument("--tp", type=int, default=1, help="check the weights split this way")
    imp.add_argument("--pp", type=int, default=1, help="check the weights split this way")
    exp = sub.add_parser("export", help="megatron weights -> Hugging Face Llama")
    exp.add_argument("--megatron", type=Path, required=True,
                     help="a converted directory, a training run's checkpoint.dir (its newest "
                          "committed step) or one committed step_<N> folder of it")
    exp.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            folder = export_hf(args.megatron, args.out)
            print(f"wrote a Hugging Face Llama to {args.out} from {folder}")
            return 0
        problems = layout_problems(HFLlama(args.hf).model, args.tp, args.pp)
        if problems:
            raise ValueError("; ".join(problems))
        model = import_hf(args.hf, args.out)
    except (OSError, ValueError, KeyError) as err:
        print(f"convert_hf: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}; train with:\n  python -m launch train.init_from={args.out} "
          + " ".join(overrides(model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

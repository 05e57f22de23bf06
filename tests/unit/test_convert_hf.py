"""HF Llama <-> megatron-core: exact round trip, and the converted model computes HF's logits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from megatron_ext.hf_llama import ARCHITECTURE, fuse_qkv, split_qkv  # noqa: E402
from megatron_ext.weights import open_weights  # noqa: E402
from tests.unit.megatron_forward import free_port, megatron_logits  # noqa: E402
from tools.convert_hf import export_hf, import_hf, layout_problems, main  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False)


def tiny_llama(folder: Path, seed: int = 0, **changes) -> Path:
    """A random LlamaForCausalLM saved like a hub checkpoint (no download)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY, **changes})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1.0; make them matter for the mapping test
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("hf") / "tiny")


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in folder.glob("*.safetensors"):
        out.update(safetensors_torch.load_file(str(path)))
    return out


def test_qkv_fusion_groups_queries_with_their_key_and_value() -> None:
    heads, groups, d, hidden = 4, 2, 3, 5
    q = torch.arange(heads * d).repeat_interleave(hidden).reshape(heads * d, hidden).float()
    k = 100 + torch.arange(groups * d).repeat_interleave(hidden).reshape(groups * d, hidden).float()
    v = 200 + torch.arange(groups * d).repeat_interleave(hidden).reshape(groups * d, hidden).float()
    fused = fuse_qkv(q, k, v, groups)
    rows = fused[:, 0].tolist()  # group 0: q heads 0,1 then k0, v0; group 1: q 2,3, k1, v1
    assert rows[:12] == [*range(6), 100, 101, 102, 200, 201, 202]
    assert rows[12:] == [*range(6, 12), 103, 104, 105, 203, 204, 205]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, heads, groups), (q, k, v)))


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_hf_megatron_hf_is_exact(tmp_path: Path, tied: bool) -> None:
    hf = tiny_llama(tmp_path / "hf", tie_word_embeddings=tied)
    import_hf(hf, tmp_path / "megatron")
    export_hf(tmp_path / "megatron", tmp_path / "back")
    before, after = _hf_tensors(hf), _hf_tensors(tmp_path / "back")
    if tied:  # transformers saves a tied lm_head too; megatron keeps one copy
        before.pop("lm_head.weight", None)
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back")
    assert config["tie_word_embeddings"] is tied and reloaded.config.num_key_value_heads == 2


def test_import_cli_checks_the_layout_and_prints_overrides(hf_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    assert main(["import", "--hf", str(hf_dir), "--out", str(tmp_path / "x"), "--tp", "3"]) == 1
    assert "--tp=3 must divide model.num_attention_heads=4" in capsys.readouterr().err
    assert main(["import", "--hf", str(hf_dir), "--out", str(tmp_path / "m"), "--tp", "2",
                 "--pp", "2"]) == 0
    assert "model.num_query_groups=2" in capsys.readouterr().out
    assert open_weights(tmp_path / "m").model == open_weights(hf_dir).model
    assert layout_problems(open_weights(hf_dir).model, 1, 3) == ["--pp=3 must divide num_layers=2"]
    # 126 layers at PP=8: megatron's uneven split (embedding and loss counted) takes them
    assert layout_problems({**open_weights(hf_dir).model, "num_layers": 126}, 1, 8) == []
    # a training checkpoint is compared on the same fields (hf_llama.ARCHITECTURE)
    assert tuple(open_weights(hf_dir).model) == ARCHITECTURE


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
               "rope_theta": 10000.0}


def _logits(weights: Path, tokens: torch.Tensor, tmp_path: Path, tp: int = 1) -> torch.Tensor:
    """Logits of the trainer's own GPTModel (TP=``tp`` spawned ranks) loaded from ``weights``."""
    torch.multiprocessing.spawn(megatron_logits, nprocs=tp,
                                args=(tp, free_port(), str(weights), tokens, str(tmp_path / "l")))
    return torch.cat([torch.load(f"{tmp_path / 'l'}.{r}") for r in range(tp)], dim=-1)


def _reference(hf: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return transformers.LlamaForCausalLM.from_pretrained(hf).eval()(tokens).logits


def test_llama_3_1_rope_scaling_gives_transformers_logits(tmp_path: Path) -> None:
    hf = tiny_llama(tmp_path / "hf", max_position_embeddings=1024, rope_parameters=LLAMA3_ROPE)
    assert open_weights(hf).model["rope_scaling_factor"] == 8.0
    tokens = torch.randint(0, TINY["vocab_size"], (1, 400),
                           generator=torch.Generator().manual_seed(5))
    logits = _logits(hf, tokens, tmp_path)[..., :TINY["vocab_size"]]
    expected = _reference(hf, tokens)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    unscaled = _reference(tiny_llama(tmp_path / "plain", max_position_embeddings=1024), tokens)
    # Ignoring the scaling would fail the comparison above: it shifts logits beyond its tolerance.
    assert not torch.allclose(unscaled, expected, atol=1e-4, rtol=1e-4)
    export_hf(hf, tmp_path / "back")  # and survives the way back
    assert json.loads((tmp_path / "back" / "config.json").read_text())["rope_scaling"] == \
        {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}


def test_rope_scaling_megatron_cannot_express_is_refused(tmp_path: Path) -> None:
    hf = tiny_llama(tmp_path / "hf", rope_parameters={**LLAMA3_ROPE, "high_freq_factor": 2.0})
    with pytest.raises(ValueError, match=r"rope_scaling.high_freq_factor=2.0 is not supported; "
                                         r"megatron-core fixes it to 4.0"):
        open_weights(hf)
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
            "original_max_position_embeddings": 256}
    with pytest.raises(ValueError, match=r"rope_scaling.rope_type='yarn' is not supported"):
        open_weights(tiny_llama(tmp_path / "yarn", rope_parameters=yarn))


@pytest.mark.slow  # two spawned ranks
def test_fewer_kv_heads_than_tp_ranks_give_transformers_logits(tmp_path: Path) -> None:
    """megatron replicates the one KV head over TP=2 (validate used to refuse this layout)."""
    hf = tiny_llama(tmp_path / "hf", num_key_value_heads=1)
    assert layout_problems(open_weights(hf).model, 2, 1) == []
    tokens = torch.randint(0, TINY["vocab_size"], (2, 24),
                           generator=torch.Generator().manual_seed(3))
    logits = _logits(hf, tokens, tmp_path, tp=2)[..., :TINY["vocab_size"]]
    torch.testing.assert_close(logits, _reference(hf, tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tp,source", [(1, "hf"), (2, "converted")])
def test_megatron_forward_matches_transformers_logits(hf_dir: Path, tmp_path: Path, tp: int,
                                                      source: str) -> None:
    weights = hf_dir if source == "hf" else tmp_path / "megatron"
    if source == "converted":
        import_hf(hf_dir, weights)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 24),
                           generator=torch.Generator().manual_seed(3))
    logits = _logits(weights, tokens, tmp_path, tp)
    expected = _reference(hf_dir, tokens)
    assert logits.shape[-1] >= expected.shape[-1]  # megatron may pad the vocabulary
    torch.testing.assert_close(logits[..., :TINY["vocab_size"]], expected, atol=1e-4, rtol=1e-4)

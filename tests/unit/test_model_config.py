"""What the run config tells megatron-core's TransformerConfig (built without a GPU)."""
from __future__ import annotations

import pytest
from megatron.core.transformer.enums import AttnBackend

from launch.schema import Layout
from megatron_ext.model import transformer_config
from tests.conftest import make_config

LAYOUT = Layout(tp=1, pp=1, cp=1, dp=1)


@pytest.mark.parametrize("backend", ["flash", "fused", "unfused"])
def test_attention_backend_reaches_transformer_engine(backend: str) -> None:
    cfg = make_config(f"model.attention_backend={backend}")
    gpu = transformer_config(cfg.model, cfg.train, LAYOUT, use_gpu=True)
    assert gpu.attention_backend == AttnBackend[backend] and gpu.bf16
    cpu = transformer_config(cfg.model, cfg.train, LAYOUT, use_gpu=False)
    assert cpu.attention_backend == AttnBackend.local and not cpu.bf16  # CPU: local spec, fp32


def test_the_local_spec_on_gpu_uses_its_own_attention() -> None:
    cfg = make_config("model.transformer_impl=local")
    gpu = transformer_config(cfg.model, cfg.train, LAYOUT, use_gpu=True)
    assert gpu.attention_backend == AttnBackend.local

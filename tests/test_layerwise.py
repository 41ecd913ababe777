"""The layer-by-layer scoring forward equals the model's own, on every architecture family it serves, with
LongRoPE factors (n-hat included) installed; other models are refused with a reason."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHITECTURES
from conftest import tiny_architecture as tiny
from longrope_cli.layerwise import _cpu_attention, causal_attention, layerwise_hidden, unsupported
from longrope_cli.losses import decoder_of
from longrope_cli.rope.factors import FactorSet
from longrope_cli.rope.layout import layout_from_config
from longrope_cli.rope.rotary import install_factors


@pytest.mark.parametrize("kind", ARCHITECTURES)
@pytest.mark.parametrize("kv_group", [1, 2])
@pytest.mark.parametrize("attend", [None, causal_attention], ids=["query-blocks", "whole-sequence"])
def test_layerwise_equals_the_models_forward_with_factors_installed(kind, kv_group, attend):
    """Both attention paths: the CPU's (queries a chunk at a time, merged by log-sum-exp) and the GPU's (SDPA
    over the group's whole q, k, v), here both on the CPU."""
    model = tiny(kind).eval()
    layout = layout_from_config(model.config)
    lam = tuple(1.0 + 3.0 * i / max(1, layout.pairs - 1) for i in range(layout.pairs))
    # short factors too: the short / long switch reads the whole sequence's length, also for a chunk (48 tokens,
    # below the 64-token window) of it
    install_factors(model, FactorSet(long_factor=lam, short_factor=(1.0,) * layout.pairs, start_tokens=4,
                                     attention=1.2, target_length=256), layout)
    ids = torch.randint(3, 96, (2, 200))
    assert unsupported(model, ids.shape[1]) is None
    with torch.no_grad():
        reference = decoder_of(model)(input_ids=ids, use_cache=False).last_hidden_state
        ours = layerwise_hidden(model, ids, chunk=48, kv_group=kv_group, attend=attend)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attend", [None, causal_attention], ids=["query-blocks", "whole-sequence"])
def test_bfloat16_layerwise_is_as_close_to_float32_as_the_models_bfloat16_forward(attend):
    """bf16 runs (GPUs score in it): the log-sum-exp merge mixes the kernel's fp32 statistics into bf16 outputs,
    and each head's output is added to a bf16 residual stream in turn; neither may cost accuracy."""
    model = tiny("llama-gqa").eval()
    ids = torch.randint(3, 96, (1, 200))
    with torch.no_grad():
        reference = decoder_of(model)(input_ids=ids, use_cache=False).last_hidden_state
        model.to(torch.bfloat16)
        theirs = decoder_of(model)(input_ids=ids, use_cache=False).last_hidden_state.float()
        ours = layerwise_hidden(model, ids, chunk=48, attend=attend)
    assert ours.dtype == torch.bfloat16
    error = (ours.float() - reference).norm() / reference.norm()
    assert error <= 1.5 * (theirs - reference).norm() / reference.norm() + 1e-3


@pytest.mark.parametrize("batch, heads, length, span, chunk", [
    (1, 1, 256, 128, 32),  # spans of whole blocks: the blocks go to the kernel as heads of one call
    (2, 3, 250, 96, 32),   # a ragged last span, block by block
    (1, 2, 64, 64, 64),    # one block per span
])
def test_cpu_attention_over_spans_equals_causal_attention_whatever_the_thread_count(batch, heads, length, span,
                                                                                     chunk):
    """Queries a span at a time against all earlier keys give the whole-sequence causal softmax; the block layout
    follows the span (not the thread count, which only sizes the span), so each case runs here on any machine."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, 16) for _ in range(3))
    reference = causal_attention(q, k, v, 0.25)
    ours = torch.cat([_cpu_attention(q[:, :, s:s + span], k, v, s, chunk, 0.25) for s in range(0, length, span)], 2)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_a_sliding_window_shorter_than_the_sequence_keeps_the_standard_forward():
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=32))
    assert "sliding window" in unsupported(model, 200)
    assert unsupported(model, 32) is None


def test_scoring_auto_goes_layerwise_for_long_windows_and_every_mode_gives_the_same_loss(monkeypatch):
    from longrope_cli import layerwise
    from longrope_cli.evaluate import perplexity

    model = tiny("llama-gqa").eval()
    ids = torch.randint(3, 96, (1, 160))
    used = []
    real = layerwise.layerwise_hidden
    monkeypatch.setattr(layerwise, "layerwise_hidden", lambda *a, **k: used.append(1) or real(*a, **k))
    standard = perplexity.window_nll(model, ids, chunk=32, scoring="standard")
    forced = perplexity.window_nll(model, ids, chunk=32, scoring="layerwise")
    assert used == [1]
    perplexity.window_nll(model, ids, chunk=32, scoring="auto")
    assert used == [1]  # 160 tokens: below LAYERWISE_FROM, the standard forward
    monkeypatch.setattr(perplexity, "LAYERWISE_FROM", 128)
    auto = perplexity.window_nll(model, ids, chunk=32, scoring="auto")
    assert used == [1, 1]
    assert standard[1] == forced[1] == auto[1] and forced[0] == pytest.approx(standard[0], rel=1e-5)


def test_a_long_forward_logs_each_layer(monkeypatch, caplog):
    import logging

    from longrope_cli import layerwise

    model = tiny("llama").eval()
    monkeypatch.setattr(layerwise, "LONG_FORWARD", 100)  # as if 100 tokens were an hour-long forward
    with caplog.at_level(logging.INFO, logger="longrope_cli.layerwise"):
        layerwise_hidden(model, torch.randint(3, 96, (1, 120)), chunk=32)
    assert [r.getMessage() for r in caplog.records] == ["scoring 120 tokens: layer 1/2 done",
                                                        "scoring 120 tokens: layer 2/2 done"]

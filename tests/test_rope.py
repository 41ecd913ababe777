"""Our rotary module against transformers' own rope types, logit for logit."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import model_logits as logits
from conftest import tiny_llama
from longrope_cli.errors import FactorFileError, ModelError
from longrope_cli.rope import baselines
from longrope_cli.rope.factors import FactorSet, attention_factor
from longrope_cli.rope.layout import layout_from_config
from longrope_cli.rope.rotary import (
    LongRopeRotaryEmbedding,
    install_factors,
    installed_factors,
    remove_factors,
)

ORIGINAL = 64


def same_weights(reference, rope_parameters=None, **kw):
    model = tiny_llama(rope_parameters, **kw)
    model.load_state_dict(reference.state_dict())
    return model


def monotone_factors(pairs: int, top: float, seed: int = 0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    steps = torch.rand(pairs, generator=gen)
    values = 1.0 + (top - 1.0) * torch.cumsum(steps, 0) / steps.sum()
    return [round(float(v), 2) for v in values]


@pytest.mark.parametrize("length", [ORIGINAL // 2, ORIGINAL * 3])
def test_matches_transformers_longrope_below_and_above_window(length):
    pairs = 16
    long_f, short_f = monotone_factors(pairs, 5.0, 0), monotone_factors(pairs, 1.3, 1)
    hf = tiny_llama({"rope_type": "longrope", "long_factor": long_f, "short_factor": short_f, "factor": 4.0,
                     "original_max_position_embeddings": ORIGINAL}, max_positions=ORIGINAL * 4)
    ours = same_weights(hf)
    layout = layout_from_config(ours.config)
    scale = attention_factor("su", 4.0, ORIGINAL)
    install_factors(ours, FactorSet(long_factor=long_f, short_factor=short_f, attention=scale, attention_policy="su"))
    expected = logits(hf, length)
    assert layout.pairs == pairs
    torch.testing.assert_close(logits(ours, length), expected, atol=2e-5, rtol=1e-4)
    # and it really differs from plain RoPE (the test can fail)
    plain = same_weights(hf)
    assert not torch.allclose(logits(plain, length), expected, atol=1e-3)


def test_pi_matches_linear():
    hf = tiny_llama({"rope_type": "linear", "factor": 4.0})
    ours = same_weights(hf)
    install_factors(ours, baselines.pi_factors(layout_from_config(ours.config), ORIGINAL * 4))
    torch.testing.assert_close(logits(ours, 150), logits(hf, 150), atol=2e-5, rtol=1e-4)


def test_yarn_matches_yarn():
    hf = tiny_llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
                    max_positions=ORIGINAL * 4)
    ours = same_weights(hf)
    layout = layout_from_config(ours.config)
    factors = baselines.yarn_factors(layout, ORIGINAL * 4)
    assert factors.attention == pytest.approx(0.1 * math.log(4.0) + 1.0)
    install_factors(ours, factors)
    torch.testing.assert_close(logits(ours, 200), logits(hf, 200), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("factor", [1.0, 4.0])
def test_dynamic_ntk_matches_dynamic_at_its_length(factor):
    length = ORIGINAL * 4
    hf = tiny_llama({"rope_type": "dynamic", "factor": factor})
    ours = same_weights(hf)
    install_factors(ours, baselines.dynamic_ntk_factors(layout_from_config(ours.config), length, factor=factor))
    torch.testing.assert_close(logits(ours, length), logits(hf, length), atol=5e-5, rtol=1e-4)


def test_dynamic_ntk_is_the_published_one():
    """alpha = L / L_orig (YaRN paper 3.3), not s^2 - s + 1: in one forward it is NTK-aware at that length."""
    layout = layout_from_config(tiny_llama().config)
    for length in (ORIGINAL * 2, ORIGINAL * 8):
        dynamic = baselines.dynamic_ntk_factors(layout, length).long_factor
        assert dynamic == pytest.approx(baselines.ntk_factors(layout, length).long_factor)
        assert dynamic[-1] == pytest.approx(length / ORIGINAL)


def test_ntk_is_a_raised_base():
    s = 4.0
    model = tiny_llama()
    layout = layout_from_config(model.config)
    d = layout.rotary_dim
    raised = tiny_llama({"rope_theta": 10000.0 * s ** (d / (d - 2))})
    raised.load_state_dict(model.state_dict())
    install_factors(model, baselines.ntk_factors(layout, int(ORIGINAL * s)))
    torch.testing.assert_close(logits(model, 180), logits(raised, 180), atol=5e-5, rtol=1e-4)


def test_start_tokens_keep_original_angles_and_magnitude():
    model = tiny_llama()
    layout = layout_from_config(model.config)
    module = LongRopeRotaryEmbedding(layout)
    module.set_factors(FactorSet(long_factor=[3.0] * layout.pairs, start_tokens=8, attention=1.2))
    positions = torch.arange(20).view(1, -1)
    cos, sin = module(torch.zeros(1, dtype=torch.float32), positions)
    plain = positions[..., None].float() * layout.inv_freq()
    scaled = plain / 3.0
    # below n-hat: the original model's tables, without the attention factor (as the official code does)
    torch.testing.assert_close(cos[:, :8], torch.cat((plain, plain), -1).cos()[:, :8])
    torch.testing.assert_close(sin[:, :8], torch.cat((plain, plain), -1).sin()[:, :8])
    torch.testing.assert_close(cos[:, 8:], 1.2 * torch.cat((scaled, scaled), -1).cos()[:, 8:])


def test_one_start_token_differs_from_none():
    """n-hat = 1 keeps position 0 untempered; it used to equal n-hat = 0 (angle 0 is the same either way)."""
    model = tiny_llama()
    layout = layout_from_config(model.config)
    out = {}
    for start in (0, 1):
        install_factors(model, FactorSet(long_factor=[3.0] * layout.pairs, start_tokens=start, attention=1.2), layout)
        out[start] = logits(model, 100)
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_none_factors_reproduce_the_model_and_remove_restores():
    model = tiny_llama()
    reference = logits(model, 100)
    install_factors(model, baselines.none_factors(layout_from_config(model.config), 128))
    assert installed_factors(model).method == "none"
    torch.testing.assert_close(logits(model, 100), reference)
    install_factors(model, baselines.pi_factors(layout_from_config(model.config), 256))  # swap without reload
    assert not torch.allclose(logits(model, 100), reference, atol=1e-3)
    remove_factors(model)
    assert installed_factors(model) is None
    torch.testing.assert_close(logits(model, 100), reference)


def test_paper_constraints_are_enforced_on_request():
    layout = layout_from_config(tiny_llama().config)
    ok = FactorSet(long_factor=monotone_factors(layout.pairs, 4.0))
    ok.check(layout, paper_constraints=True)
    decreasing = FactorSet(long_factor=[1.0] * 8 + [2.0] + [1.5] * 7)
    below_one = FactorSet(long_factor=[0.9] + [1.0] * 15)
    decreasing.check(layout)  # allowed without the paper's constraints
    with pytest.raises(FactorFileError, match="decreases at pair 9"):
        decreasing.check(layout, paper_constraints=True)
    with pytest.raises(FactorFileError, match="< 1"):
        below_one.check(layout, paper_constraints=True)
    with pytest.raises(FactorFileError, match="16 frequency pairs"):
        FactorSet(long_factor=[1.0] * 5).check(layout)
    with pytest.raises(FactorFileError, match="finite positive"):
        FactorSet(long_factor=[1.0] * 15 + [float("nan")]).check(layout)


def test_partial_rotary_dims_are_respected():
    model = tiny_llama(rope_parameters={"partial_rotary_factor": 0.5})
    layout = layout_from_config(model.config)
    assert layout.rotary_dim == 16 and layout.pairs == 8


def test_model_without_rotary_is_refused():
    with pytest.raises(ModelError, match="no replaceable rotary"):
        install_factors(torch.nn.Linear(2, 2), FactorSet(long_factor=[1.0]))


def test_baselines_shapes_and_order():
    layout = layout_from_config(tiny_llama().config)
    target = ORIGINAL * 8
    for name in baselines.BASELINES:
        factors = baselines.baseline_factors(name, layout, target)
        assert factors.pairs == layout.pairs
        factors.check(layout, paper_constraints=True)
    ntk = baselines.ntk_factors(layout, target).long_factor
    assert ntk[0] == pytest.approx(1.0) and ntk[-1] == pytest.approx(8.0)
    yarn = baselines.yarn_factors(layout, target).long_factor
    assert yarn[0] == pytest.approx(1.0) and yarn[-1] == pytest.approx(8.0)


def test_progressive_yarn_reads_the_fine_tuned_wavelengths():
    """YaRN for a fine-tuned model ramps on theta_i / b_i: a pair the base slowed to under one turn in the
    fine-tuning window is interpolated by the full s', whatever its raw wavelength."""
    layout = layout_from_config(tiny_llama().config)
    window = ORIGINAL * 4
    ones = (1.0,) * layout.pairs
    plain = baselines.yarn_relative_factors(layout, ones, window, window * 8)
    turns = [window * theta / (2 * math.pi) for theta in layout.inv_freq().tolist()]
    for factor, t in zip(plain, turns, strict=True):  # without a base it is YaRN over `window`
        if t >= 32:
            assert factor == pytest.approx(1.0)
        elif t <= 1:
            assert factor == pytest.approx(8.0)
    assert list(plain) == sorted(plain)
    fast = next(i for i, t in enumerate(turns) if 2 < t < 32)
    slowed = tuple(1.0 if i < fast else 64.0 for i in range(layout.pairs))  # every pair from `fast` on: < 1 turn
    relative = baselines.yarn_relative_factors(layout, slowed, window, window * 8)
    assert plain[fast] < 8.0 and relative[fast:] == pytest.approx((8.0,) * (layout.pairs - fast))
    assert relative[:fast] == pytest.approx(plain[:fast])


def test_original_rotary_is_temporary():
    from longrope_cli.rope.rotary import original_rotary

    model = tiny_llama()
    factors = baselines.pi_factors(layout_from_config(model.config), 256)
    install_factors(model, factors)
    with original_rotary(model):
        assert installed_factors(model) is None
    assert installed_factors(model) == factors

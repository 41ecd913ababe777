"""Pre-scaled models (llama3, yarn, linear, longrope configs): their own RoPE as a FactorSet, and baselines on top."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from conftest import model_logits as logits
from conftest import tiny_llama
from longrope_cli.rope import baselines
from longrope_cli.rope.layout import layout_from_config
from longrope_cli.rope.native import native_base, native_factors
from longrope_cli.rope.rotary import install_factors, remove_factors

ORIGINAL = 64
PAIRS = 16


def ramp(top: float, pairs: int = PAIRS) -> list[float]:
    return [round(1.0 + (top - 1.0) * (i / (pairs - 1)) ** 1.5, 3) for i in range(pairs)]


LLAMA3 = ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": ORIGINAL}, 512)
YARN = ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}, 256)
LINEAR = ({"rope_type": "linear", "factor": 4.0}, 256)
LONGROPE = ({"rope_type": "longrope", "long_factor": ramp(5.0), "short_factor": ramp(1.3), "factor": 4.0,
             "original_max_position_embeddings": ORIGINAL}, 256)
CASES = {"llama3": LLAMA3, "yarn": YARN, "linear": LINEAR, "longrope": LONGROPE}


def shipped(kind: str):
    params, window = CASES[kind]
    return tiny_llama(params, max_positions=window)


def twin(reference, params=None, window=None):
    """A model with the same weights as `reference` and another RoPE config (default: plain RoPE)."""
    model = tiny_llama(params, max_positions=window)
    model.load_state_dict(reference.state_dict())
    return model


@pytest.mark.parametrize("kind, length", [("llama3", 100), ("llama3", 400), ("yarn", 200), ("linear", 150),
                                          ("longrope", ORIGINAL // 2), ("longrope", ORIGINAL * 3)])
def test_native_factors_reproduce_transformers(kind, length, caplog):
    hf = shipped(kind)
    params, window = CASES[kind]
    ours = twin(hf, params, window)
    layout = layout_from_config(ours.config)
    native = native_factors(ours, layout)
    assert native is not None and native.pairs == layout.pairs and native.target_length == layout.shipped_window
    expected = logits(hf, length)
    with caplog.at_level(logging.WARNING, logger="longrope_cli"):
        install_factors(ours, native, layout)
    assert not caplog.records  # exact: nothing to warn about
    torch.testing.assert_close(logits(ours, length), expected, atol=2e-5, rtol=1e-4)
    # the model's own scaling is not plain RoPE (so the check can fail), nor plain RoPE x nothing
    assert not torch.allclose(logits(twin(hf), length), expected, atol=1e-3)


def test_native_factors_are_the_configs_own_numbers():
    linear = native_factors(shipped("linear"))
    assert linear.long_factor == (4.0,) * PAIRS and linear.attention == 1.0 and linear.short_factor is None
    longrope = native_factors(shipped("longrope"))
    assert longrope.long_factor == tuple(LONGROPE[0]["long_factor"])  # clean digits, bit-exact in the module
    assert longrope.short_factor == tuple(LONGROPE[0]["short_factor"])
    assert longrope.attention == pytest.approx(math.sqrt(1 + math.log(4.0) / math.log(ORIGINAL)))
    yarn = native_factors(shipped("yarn"))
    assert yarn.attention == pytest.approx(0.1 * math.log(4.0) + 1.0) and yarn.attention_policy == "yarn"
    llama3 = native_factors(shipped("llama3"))
    assert llama3.long_factor[0] == 1.0 and llama3.long_factor[-1] == pytest.approx(8.0)
    assert list(llama3.long_factor) == sorted(llama3.long_factor) and llama3.attention == 1.0


def test_plain_and_dynamic_have_no_native_factors(caplog):
    assert native_factors(tiny_llama()) is None
    dynamic = tiny_llama({"rope_type": "dynamic", "factor": 2.0})
    with caplog.at_level(logging.WARNING, logger="longrope_cli"):
        assert native_factors(dynamic) is None
        install_factors(dynamic, baselines.none_factors(layout_from_config(dynamic.config), 128))
    assert any("dynamic" in r.getMessage() and "length" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["llama3", "yarn", "linear"])
def test_install_no_longer_warns_for_fixed_scalings(kind, caplog):
    model = shipped(kind)
    layout = layout_from_config(model.config)
    with caplog.at_level(logging.WARNING, logger="longrope_cli"):
        install_factors(model, baselines.pi_factors(layout, 4 * layout.shipped_window), layout)
    assert [r.getMessage() for r in caplog.records] == []


def test_layout_records_the_native_scaling():
    for kind, (_params, window) in CASES.items():
        layout = layout_from_config(shipped(kind).config)
        assert layout.rope_type == kind and layout.prescaled
        assert layout.shipped_length == window and layout.shipped_window == window
        # original_length is the window of the plain theta_i, as before (linear has no other one to give)
        assert layout.original_length == (window if kind == "linear" else ORIGINAL)
        assert hash(layout) == hash(layout_from_config(shipped(kind).config))
        data = json.loads(json.dumps(layout.to_dict()))
        assert data["rope_type"] == kind and data["shipped_length"] == window
    # Qwen-style yarn: max_position_embeddings left at the pretraining window, the shipped one is factor x it
    qwen = layout_from_config(tiny_llama(YARN[0], max_positions=ORIGINAL).config)
    assert qwen.shipped_window == 4 * ORIGINAL
    plain = layout_from_config(tiny_llama().config)
    assert not plain.prescaled and plain.shipped_length is None and plain.shipped_window == ORIGINAL
    assert set(plain.to_dict()) == {"rotary_dim", "rope_theta", "original_length", "head_dim", "model_type", "name"}


@pytest.mark.parametrize("kind, length", [("llama3", 600), ("longrope", ORIGINAL // 2), ("longrope", 200)])
def test_none_baseline_is_the_shipped_model(kind, length):
    hf = shipped(kind)
    ours = twin(hf, *CASES[kind])
    layout = layout_from_config(ours.config)
    none = baselines.baseline_factors("none", layout, 1024, native=native_factors(ours, layout))
    assert none.method == "none"
    install_factors(ours, none, layout)
    torch.testing.assert_close(logits(ours, length), logits(hf, length), atol=2e-5, rtol=1e-4)
    # without the native factors `none` is plain RoPE, which this model is not
    install_factors(ours, baselines.baseline_factors("none", layout, 1024), layout)
    assert not torch.allclose(logits(ours, length), logits(hf, length), atol=1e-3)


def test_pi_at_twice_the_shipped_window_of_linear_4_is_linear_8():
    model = shipped("linear")
    layout = layout_from_config(model.config)
    pi = baselines.baseline_factors("pi", layout, 2 * layout.shipped_window, native=native_factors(model, layout))
    assert pi.long_factor == pytest.approx((8.0,) * PAIRS)
    linear8 = twin(model, {"rope_type": "linear", "factor": 8.0}, LINEAR[1])
    install_factors(model, pi, layout)
    torch.testing.assert_close(logits(model, 300), logits(linear8, 300), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama3", "yarn", "longrope"])
def test_baselines_inside_the_shipped_window_are_the_shipped_model(kind):
    model = shipped(kind)
    layout = layout_from_config(model.config)
    native = native_factors(model, layout)
    for name in baselines.BASELINES:
        factors = baselines.baseline_factors(name, layout, layout.shipped_window, native=native)
        assert factors.long_factor == pytest.approx(native.long_factor), name
        assert factors.short_factor == native.short_factor and factors.attention == pytest.approx(native.attention)
        beyond = baselines.baseline_factors(name, layout, 4 * layout.shipped_window, native=native)
        assert beyond.method == name and beyond.target_length == 4 * layout.shipped_window
        if name != "none":  # on top of the native factors: each pair at least as interpolated as shipped
            assert all(b >= n - 1e-9 for b, n in zip(beyond.long_factor, native.long_factor, strict=True))
            assert beyond.long_factor[-1] == pytest.approx(4 * native.long_factor[-1])
        assert beyond.short_factor == native.short_factor  # a longrope model keeps its short regime


def test_yarn_on_top_reads_the_native_wavelengths():
    """On a linear-c model of shipped window W, pair i turns W theta_i / c over W: YaRN on top is c x YaRN of plain
    RoPE over W / c (a ramp on the plain wavelengths would leave the slowed pairs un-interpolated)."""
    model = shipped("linear")
    layout = layout_from_config(model.config)
    window, target = layout.shipped_window, 8 * layout.shipped_window
    yarn = baselines.baseline_factors("yarn", layout, target, native=native_factors(model, layout))
    ones = (1.0,) * layout.pairs
    expected = baselines.yarn_relative_factors(layout, ones, window // 4, target // 4)
    assert yarn.long_factor == pytest.approx(tuple(4.0 * e for e in expected))
    plain_ramp = baselines.yarn_relative_factors(layout, ones, window, target)
    assert yarn.long_factor != pytest.approx(tuple(4.0 * p for p in plain_ramp))
    assert yarn.attention == pytest.approx(0.1 * math.log(8.0) + 1.0)
    # on a yarn model the temperatures compose: native x YaRN's own for s' = L / W
    yarn_model = shipped("yarn")
    yarn_layout = layout_from_config(yarn_model.config)
    on_yarn = baselines.baseline_factors("yarn", yarn_layout, 2 * YARN[1], native=native_factors(yarn_model))
    assert on_yarn.attention == pytest.approx((0.1 * math.log(4.0) + 1.0) * (0.1 * math.log(2.0) + 1.0))


def test_pi_on_longrope_keeps_the_short_regime_as_shipped():
    hf = shipped("longrope")
    ours = twin(hf, *CASES["longrope"])
    layout = layout_from_config(ours.config)
    pi = baselines.baseline_factors("pi", layout, 2 * layout.shipped_window, native=native_factors(ours, layout))
    install_factors(ours, pi, layout)
    torch.testing.assert_close(logits(ours, ORIGINAL // 2), logits(hf, ORIGINAL // 2), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(logits(ours, 200), logits(hf, 200), atol=1e-3)  # the long regime is extended
    long_twice = twin(hf, {**LONGROPE[0], "long_factor": [2 * f for f in LONGROPE[0]["long_factor"]]}, LONGROPE[1])
    torch.testing.assert_close(logits(ours, 200), logits(long_twice, 200), atol=2e-5, rtol=1e-4)


def test_native_base_for_the_search(tmp_path, tiny_tokenizer):
    from longrope_cli.models import load_model

    model = tiny_llama(LLAMA3[0], max_positions=LLAMA3[1], vocab=len(tiny_tokenizer))
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), device="cpu")
    base = native_base(lm)
    assert base is not None and base.target_length == LLAMA3[1] and base.provenance["base"] == "native"
    assert base.long_factor == native_factors(lm.model, lm.layout).long_factor == lm.native.long_factor
    assert native_base(tiny_llama()) is None
    # relative x base is what a progressive search installs: relative ones are the model as shipped
    reference = logits(lm.model, 300)
    install_factors(lm.model, base, lm.layout)
    torch.testing.assert_close(logits(lm.model, 300), reference, atol=2e-5, rtol=1e-4)
    remove_factors(lm.model)


def test_eval_none_is_the_model_as_shipped(tmp_path, tiny_tokenizer, tiny_corpus):
    from longrope_cli.data import load_corpus, tokenize_documents
    from longrope_cli.evaluate.perplexity import score_perplexity
    from longrope_cli.models import load_model
    from longrope_cli.recipe import build_recipe
    from longrope_cli.stages import evaluate as runner

    model = tiny_llama(LLAMA3[0], max_positions=LLAMA3[1], vocab=len(tiny_tokenizer))
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), device="cpu")
    recipe = build_recipe({"model": {"name": str(tmp_path / "m"), "device": "cpu"},
                           "data": {"corpus": str(tiny_corpus), "cache_dir": str(tmp_path / "tokens")},
                           "eval": {"lengths": [256], "methods": ["none", "pi"], "documents": 1, "plots": False}})
    results = json.loads(runner.run_eval(recipe, tmp_path / "out", lm=lm, progress=False).artifact.read_text())
    cells = {c["method"]: c["perplexity"] for c in results["perplexity"]}
    docs = tokenize_documents(load_corpus(str(tiny_corpus)).split("eval"), lm.tokenizer, tmp_path / "tokens")
    windows, _, _ = runner._windows_for(recipe, docs, lm.tokenizer.bos_token_id, 256)
    shipped_ppl = score_perplexity(model, windows).perplexity  # transformers' own llama3 module, untouched
    assert cells["none"] == pytest.approx(shipped_ppl, rel=1e-5)
    plain = twin(model)
    assert abs(score_perplexity(plain, windows).perplexity - shipped_ppl) > 1e-3  # so the check can fail
    # 256 is inside the shipped window of 512: pi there is the model as shipped, not PI for s = 256 / 64
    methods = {m["label"]: m["factors"] for m in results["methods"]}
    assert methods["pi"]["long_factor"] == pytest.approx(methods["none"]["long_factor"])
    assert cells["pi"] == pytest.approx(cells["none"], rel=1e-6)


def test_search_on_a_prescaled_model_extends_it_from_what_it_ships(tmp_path):
    """A linear-4 model searched at 2x its shipped window: relative to the native factors (like a progressive
    search), so the PI seed is linear-8 and every candidate is native x relative."""
    from conftest import build_tiny_tokenizer
    from longrope_cli.models import load_model
    from longrope_cli.recipe import load_recipe
    from longrope_cli.stages.search import run_search

    model = tiny_llama({"rope_type": "linear", "factor": 4.0}, max_positions=256)
    model.save_pretrained(tmp_path / "m")
    build_tiny_tokenizer(tmp_path).save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), device="cpu")
    windows = torch.randint(3, 300, (2, 512), generator=torch.Generator().manual_seed(0))
    recipe = load_recipe(None, [f"model.name={tmp_path / 'm'}", "search.target=512", "search.population=4",
                                "search.survivors=2", "search.mutations=1", "search.crossovers=1",
                                "search.iterations=1", "search.documents=2", "search.start_tokens=0"])
    result = run_search(recipe, tmp_path / "out", lm=lm, windows=windows, progress=False)
    assert result.best.provenance["base_factors"] == "native linear"
    relative = result.best.provenance["relative_factor"]
    assert result.best.long_factor == pytest.approx([4.0 * r for r in relative])
    pi = [json.loads(line) for line in (tmp_path / "out" / "candidates.jsonl").read_text().splitlines()
          if json.loads(line)["origin"] == "pi"][0]
    assert pi["factors"] == pytest.approx([8.0] * lm.layout.pairs)

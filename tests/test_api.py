"""The Python API on the tiny model: extend_context, install/remove, save, export, scoring."""

from __future__ import annotations

import pytest
import torch

import longrope_cli
from conftest import SMALL_SEARCH
from longrope_cli import extend_context, load_model, remove_factors, save_factors, use_factors
from longrope_cli.errors import DataError, RecipeError
from longrope_cli.rope.factors import load_factors
from longrope_cli.rope.rotary import installed_factors

SMALL = {**SMALL_SEARCH, "iterations": 1, "start_tokens": 0}


def test_every_public_name_is_documented():
    for name in longrope_cli.__all__:
        if name == "__version__":
            continue
        obj = getattr(longrope_cli, name)
        assert obj.__doc__ and obj.__doc__.strip(), f"{name} has no docstring"


def test_extend_context_installs_the_best_factors(tiny_model_dir, tiny_corpus, tmp_path):
    lm = load_model(str(tiny_model_dir), device="cpu")
    result = extend_context(lm, str(tiny_corpus), 128, out_dir=tmp_path / "s", **SMALL)
    assert installed_factors(lm.model) == result.factors
    assert result.factors.target_length == 128 and result.evaluations >= 6
    assert load_factors(result.factors_path, lm.layout) == result.factors
    ids = torch.randint(0, 300, (1, 128))
    with torch.no_grad():
        assert lm.model(ids).logits.shape == (1, 128, lm.model.config.vocab_size)


def test_extend_context_accepts_texts_and_tokens(tiny_model_dir, tiny_corpus, tmp_path):
    lm = load_model(str(tiny_model_dir), device="cpu")
    texts = [p.read_text() for p in sorted((tiny_corpus / "search").glob("*.txt"))]
    from_texts = extend_context(lm, texts, 128, out_dir=tmp_path / "a", **SMALL)
    tokens = torch.randint(3, 300, (2, 200))
    from_tokens = extend_context(lm, tokens, 128, out_dir=tmp_path / "b", **SMALL)
    assert from_texts.factors.pairs == from_tokens.factors.pairs == lm.layout.pairs
    with pytest.raises(RecipeError, match="did you mean 'search.population'"):
        extend_context(lm, texts, 128, populaton=4)
    with pytest.raises(DataError, match="list of texts"):
        extend_context(lm, 42, 128, **SMALL)


def test_use_save_remove(tiny_model_dir, tmp_path):
    from longrope_cli import baseline_factors

    lm = load_model(str(tiny_model_dir), device="cpu")
    yarn = baseline_factors("yarn", lm.layout, 256)
    path = save_factors(yarn, lm.layout, tmp_path / "yarn.json")
    assert use_factors(lm, path) == load_factors(path)
    assert installed_factors(lm.model).method == "yarn"
    remove_factors(lm.model)
    assert installed_factors(lm.model) is None

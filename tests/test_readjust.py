"""`run_readjust`: short factors searched on the extended model with the same engine; the result exports."""

from __future__ import annotations

import json

import pytest

from longrope_cli.errors import RecipeError
from longrope_cli.models import load_model
from longrope_cli.outputs import is_complete
from longrope_cli.recipe import load_recipe
from longrope_cli.rope.baselines import yarn_factors
from longrope_cli.rope.export import longrope_rope_parameters
from longrope_cli.rope.factors import load_factors
from longrope_cli.rope.rotary import installed_factors
from longrope_cli.stages.readjust import run_readjust

SMALL = ["readjust.population=8", "readjust.iterations=2", "readjust.documents=2"]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture
def long_factors(lm, tmp_path):
    return yarn_factors(lm.layout, 256).save(tmp_path / "long.json", lm.layout)


def recipe_for(model_dir, corpus, factors, *overrides):
    return load_recipe(None, [f"model.name={model_dir}", f"data.corpus={corpus}", f"readjust.factors={factors}",
                              *SMALL, *overrides])


def long_factors_score(value):
    """A scorer that fixes the score of the long factors used at short lengths (a random model makes either side
    win); everything else is scored for real."""
    from types import SimpleNamespace

    from longrope_cli.evaluate.perplexity import score_perplexity

    def scored(model, windows, **kw):
        if installed_factors(model).short_factor is None:
            return SimpleNamespace(perplexity=value)
        return score_perplexity(model, windows, **kw)

    return scored


def test_readjust_writes_short_and_long_factors(lm, tiny_model_dir, tiny_corpus, long_factors, tmp_path,
                                                monkeypatch):
    long_set = load_factors(long_factors)
    out = tmp_path / "out"
    result = run_readjust(recipe_for(tiny_model_dir, tiny_corpus, long_factors, "readjust.lengths=32,64",
                                     "readjust.factor_max=1.5"), out, lm=lm, progress=False,
                          scorer=long_factors_score(1e9))
    final = load_factors(out / "factors.json", lm.layout, target_length=256)
    assert final.long_factor == long_set.long_factor  # kept
    assert final.attention == long_set.attention and final.start_tokens == 0
    short = final.short_factor
    assert short is not None and len(short) == lm.layout.pairs
    assert all(1.0 <= v <= 1.5 for v in short) and list(short) == sorted(short)
    assert result.evaluations == 8 + 2 * 4 == len((out / "candidates.jsonl").read_text().splitlines())
    prov = final.provenance
    assert prov["stage"] == "readjust" and prov["lengths"] == [32, 64]
    assert set(prov["perplexity_by_length"]) == {"32", "64"}
    mean = sum(prov["perplexity_by_length"].values()) / 2
    assert mean == pytest.approx(result.best_perplexity, rel=1e-6)  # fitness = mean over the lengths
    assert is_complete(out) and json.loads((out / "complete.json").read_text())["stage"] == "readjust"
    params = longrope_rope_parameters(final, lm.layout, 256)  # exportable: both lists, n-hat 0
    assert params["short_factor"] == list(short) and params["long_factor"] == list(long_set.long_factor)
    assert installed_factors(lm.model) is None


def test_readjust_lengths_must_fit_the_original_window(lm, tiny_model_dir, tiny_corpus, long_factors, tmp_path):
    with pytest.raises(RecipeError, match="exceed the original window"):
        run_readjust(recipe_for(tiny_model_dir, tiny_corpus, long_factors, "readjust.lengths=32,128"), tmp_path,
                     lm=lm, progress=False)
    with pytest.raises(RecipeError, match="readjust.factors is not set"):
        run_readjust(load_recipe(None, []), tmp_path, lm=lm, progress=False)


def test_default_lengths_follow_a_small_window_and_resume_is_a_no_op(lm, tiny_model_dir, tiny_corpus, long_factors,
                                                                     tmp_path):
    recipe = recipe_for(tiny_model_dir, tiny_corpus, long_factors, "readjust.iterations=1")
    first = run_readjust(recipe, tmp_path, lm=lm, progress=False)
    assert first.best.provenance["lengths"] == [32, 64]  # 4k, 8k do not fit a 64-token window
    again = run_readjust(recipe, tmp_path, lm=lm, resume=True, progress=False)
    assert again.best.short_factor == first.best.short_factor and again.evaluations == first.evaluations


def test_readjust_never_returns_worse_than_the_long_factors(lm, tiny_model_dir, tiny_corpus, long_factors, tmp_path,
                                                            monkeypatch):
    result = run_readjust(recipe_for(tiny_model_dir, tiny_corpus, long_factors, "readjust.lengths=32,64"),
                          tmp_path / "out", lm=lm, progress=False,
                          scorer=long_factors_score(1.5))  # the long factors beat every short set under the ceiling
    final = load_factors(tmp_path / "out" / "factors.json", lm.layout)
    assert final.short_factor == final.long_factor == load_factors(long_factors).long_factor
    assert result.best_perplexity == 1.5 and final.provenance["short_factor_is_long_factor"] is True

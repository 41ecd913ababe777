"""Search mistakes and failures end in one clear error, and every JSON file stays strict JSON."""

from __future__ import annotations

import json
import math

import pytest

from conftest import small_search
from longrope_cli.errors import RecipeError
from longrope_cli.models import load_model
from longrope_cli.outputs import atomic_write_json, is_complete
from longrope_cli.recipe import load_recipe
from longrope_cli.stages.search import run_search

SMALL = small_search(iterations=1)


def strict_load(path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def recipe_for(model_dir, corpus, *overrides):
    return load_recipe(None, [f"model.name={model_dir}", "model.device=cpu", f"data.corpus={corpus}",
                              "search.target=256", *SMALL, *overrides])


def test_a_search_where_every_candidate_diverges_fails_clearly(lm, tiny_model_dir, tiny_corpus, tmp_path):
    handle = lm.model.model.norm.register_forward_hook(lambda module, args, output: output * float("nan"))
    try:
        with pytest.raises(RecipeError, match="every candidate scored inf or NaN"):
            run_search(recipe_for(tiny_model_dir, tiny_corpus), tmp_path, lm=lm, progress=False)
    finally:
        handle.remove()
    assert not is_complete(tmp_path)
    for path in tmp_path.glob("*.json"):
        strict_load(path)
    for line in (tmp_path / "candidates.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))


@pytest.mark.parametrize("override, key", [
    ("search.max_minutes=-1", "search.max_minutes"), ("search.max_minutes=.nan", "search.max_minutes"),
    ("search.race_margin=.nan", "search.race_margin"), ("search.factor_step=.inf", "search.factor_step"),
    ("search.factor_min=0", "search.factor_min"), ("search.factor_max_ratio=.nan", "search.factor_max_ratio"),
])
def test_bad_numbers_name_their_key(lm, tiny_model_dir, tiny_corpus, tmp_path, override, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        run_search(recipe_for(tiny_model_dir, tiny_corpus, override), tmp_path, lm=lm, progress=False)


def test_json_files_are_strict(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": math.inf, "b": [float("nan"), -math.inf, 1.5]})
    assert strict_load(tmp_path / "x.json") == {"a": "inf", "b": ["nan", "-inf", 1.5]}

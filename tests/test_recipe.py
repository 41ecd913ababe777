"""Recipe parsing: lengths, strictness, precedence, one-line errors."""

from __future__ import annotations

import pytest

from longrope_cli.errors import RecipeError
from longrope_cli.lengths import format_length, parse_length, parse_lengths
from longrope_cli.recipe import build_recipe, field_docs, load_recipe, recipe_to_dict, require_target


@pytest.mark.parametrize("text,tokens", [
    ("4096", 4096), (4096, 4096), ("4k", 4096), ("256k", 262144), ("2048k", 2097152), ("2m", 2097152),
    ("2M", 2097152), ("1.5k", 1536),
])
def test_lengths(text, tokens):
    assert parse_length(text) == tokens


@pytest.mark.parametrize("bad", ["4kb", "-1", "0", "abc", "1.3k", True, ""])
def test_bad_lengths_are_one_line_errors(bad):
    with pytest.raises(RecipeError) as info:
        parse_length(bad, "search.target")
    assert "search.target" in str(info.value) and "\n" not in str(info.value)


def test_format_and_list():
    assert format_length(2097152) == "2048k" and format_length(300) == "300"
    assert parse_lengths("256,512, 1k") == [256, 512, 1024]


def test_precedence_defaults_file_overrides_flags(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("search:\n  population: 16\n  target: 8k\n  iterations: 3\n")
    recipe = load_recipe(path, ["search.population=24", "search.target=16k"], {"search.target": 32768})
    assert recipe.search.population == 24  # override beats file
    assert recipe.search.target == 32768  # flag beats override
    assert recipe.search.iterations == 3  # file beats default
    assert recipe.search.mutation_prob == 0.3  # default


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(RecipeError, match=r"unknown recipe key 'search.populaton': did you mean 'search.population'\?"):
        build_recipe({"search": {"populaton": 3}})
    with pytest.raises(RecipeError, match="unknown recipe key 'serch'"):
        build_recipe(overrides=["serch.population=3"])


def test_wrong_types_name_the_key():
    with pytest.raises(RecipeError, match="search.population: expected an integer"):
        build_recipe(overrides=["search.population=many"])
    with pytest.raises(RecipeError, match="finetune.schedule: 'linar' is not one of .*did you mean 'linear'"):
        build_recipe({"finetune": {"schedule": "linar"}})
    with pytest.raises(RecipeError, match="eval.lengths"):
        build_recipe(overrides=["eval.lengths=4k,banana"])
    with pytest.raises(RecipeError, match="key=value"):
        build_recipe(overrides=["search.population"])


def test_lists_and_bools_from_the_command_line():
    recipe = build_recipe(overrides=["eval.lengths=4k,8k", "search.racing=yes", "eval.methods=[none, pi]"])
    assert recipe.eval.lengths == [4096, 8192]
    assert recipe.search.racing is True
    assert recipe.eval.methods == ["none", "pi"]


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping of sections"):
        load_recipe(listy)


def test_target_must_exceed_the_original_window():
    with pytest.raises(RecipeError, match="not larger than the model's original window 4k"):
        require_target(4096, 4096, "search.target")
    with pytest.raises(RecipeError, match="--target"):
        require_target(None, 4096, "search.target")
    assert require_target(8192, 4096, "search.target") == 8192


def test_round_trip_and_docs():
    recipe = build_recipe(overrides=["search.target=256k", "stages=[{name: s, command: search}]"])
    data = recipe_to_dict(recipe)
    assert data["search"]["target"] == "256k"
    assert build_recipe(data) == recipe
    keys = {row[0] for row in field_docs()}
    assert {"search.population", "finetune.lr", "eval.lengths", "model.name"} <= keys
    assert all(row[3] for row in field_docs()), "every key documents itself"

"""The bundled recipes: package data, `longrope recipe ls / cp`, and a bare NAME wherever a recipe is accepted."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner

from longrope_cli.bundled import bundled_recipes, recipe_title, resolve_recipe
from longrope_cli.cli.main import cli
from longrope_cli.errors import RecipeError
from longrope_cli.hf_compat import save_tokenizer
from longrope_cli.pipeline import plan_pipeline, stage_command

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("tiny", "llama2-7b-2m", "mistral-7b-2m")


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def one_line_error(result, *words: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_recipes_are_package_data():
    """Inside the longrope_cli package (what a wheel installs), declared in setup.cfg, and the checkout's
    recipes/ is the same folder."""
    folder = resources.files("longrope_cli") / "recipes"
    for name in NAMES:
        assert (folder / f"{name}.yaml").is_file()
    assert (folder / "tiny.yaml").read_text(encoding="utf-8").startswith("# ")
    package_data = (ROOT / "setup.cfg").read_text(encoding="utf-8").split("[options.package_data]")[1]
    assert "recipes/*.yaml" in package_data.split("[")[0]
    assert (ROOT / "recipes" / "tiny.yaml").resolve() == Path(str(folder / "tiny.yaml")).resolve()
    assert set(bundled_recipes()) >= set(NAMES)


def test_recipe_ls_lists_names_and_first_comment_lines():
    result = run("recipe", "ls")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines()}
    assert set(rows) == set(bundled_recipes()) and "tiny" in rows
    assert "The progressive LongRoPE pipeline on the bundled CPU test bed" in rows["tiny"]
    assert recipe_title(bundled_recipes()["tiny"]) in rows["tiny"]
    assert not rows["tiny"].rstrip().endswith(":")


def test_recipe_cp_copies_and_refuses_to_overwrite(tmp_path):
    dest = tmp_path / "mine.yaml"
    done = run("recipe", "cp", "tiny", str(dest))
    assert done.exit_code == 0, done.output
    source = bundled_recipes()["tiny"]
    assert dest.read_bytes() == source.read_bytes()

    dest.write_text("model: {name: testbed}\n")
    one_line_error(run("recipe", "cp", "tiny", str(dest)), "exists", "--force")
    assert dest.read_text() == "model: {name: testbed}\n"  # untouched
    assert run("recipe", "cp", "tiny", str(dest), "--force").exit_code == 0
    assert dest.read_bytes() == source.read_bytes()

    into = tmp_path / "configs"
    into.mkdir()
    assert run("recipe", "cp", "mistral-7b-2m", str(into)).exit_code == 0
    assert (into / "mistral-7b-2m.yaml").read_bytes() == bundled_recipes()["mistral-7b-2m"].read_bytes()
    one_line_error(run("recipe", "cp", "tiny", str(tmp_path / "missing" / "x.yaml")), "does not exist")
    one_line_error(run("recipe", "cp", "nosuch", str(tmp_path / "y.yaml")), "unknown recipe 'nosuch'", "tiny")
    assert not (tmp_path / "y.yaml").exists()


def test_a_bare_name_is_the_bundled_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: no recipes/ folder here
    assert resolve_recipe("tiny") == bundled_recipes()["tiny"]
    shown = run("recipe", "show", "tiny", "search.population=7")
    assert shown.exit_code == 0 and "population: 7" in shown.output and "stages:" in shown.output, shown.output
    valid = run("recipe", "validate", "tiny")
    assert valid.exit_code == 0 and valid.output.startswith("ok: tiny (search-2k"), valid.output

    root, plan = plan_pipeline("tiny", out_root=tmp_path / "runs")
    assert [s.name for s in plan][:2] == ["search-2k", "eval-base"]
    assert stage_command(plan[0], "tiny")[:3] == ["longrope", "search", "tiny"]  # stage commands resolve it too
    dry = run("run", "tiny", "--dry-run")
    assert dry.exit_code == 0 and dry.output.startswith("# tiny: ") and "runs/tiny/search-2k" in dry.output

    # an existing file of that name wins over the bundled recipe
    (tmp_path / "tiny").write_text("search: {population: 5}\n")
    assert resolve_recipe("tiny") == Path("tiny")
    assert "population: 5" in run("recipe", "show", "tiny").output


@pytest.mark.parametrize("args", [
    ("run", "nosuch", "--dry-run"),
    ("recipe", "show", "nosuch"),
    ("recipe", "validate", "nosuch", "search.population=8"),
    ("search", "nosuch", "--target", "2k"),
    ("eval", "nosuch"),
])
def test_an_unknown_name_is_a_one_line_error_listing_the_bundled_ones(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(run(*args), "'nosuch'")
    for name in NAMES:
        assert name in line
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_missing_yaml_path_is_not_looked_up_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match="'tiny.yaml' not found"):
        resolve_recipe("tiny.yaml")
    with pytest.raises(RecipeError, match="not found"):
        resolve_recipe("sub/tiny")
    one_line_error(run("run", "tiny.yaml", "--dry-run"), "not found", "tiny")


class _Saves:
    """A stand-in for a transformers 5.x tokenizer: save_pretrained writes what 5.x writes."""

    def __init__(self, cls: str):
        self.cls = cls

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps(
            {"backend": "tokenizers", "model_max_length": 10**30, "tokenizer_class": self.cls}))


@pytest.mark.parametrize("written, kept", [
    ("TokenizersBackend", "PreTrainedTokenizerFast"),  # 5.x-only name -> the one 4.57 has too
    ("LlamaTokenizer", "LlamaTokenizer"),              # 4.57 loads LlamaTokenizerFast for it: left alone
    ("PreTrainedTokenizerFast", "PreTrainedTokenizerFast"),
])
def test_saved_tokenizer_names_a_class_transformers_4_57_has(written, kept, tmp_path):
    save_tokenizer(_Saves(written), tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == kept and config["model_max_length"] == 10**30

"""`longrope search` / `longrope readjust` from the command line: thin commands over the library.

Unit tier: argument errors and a tiny-model search in process. Integration tier (`make test`): the bundled
test bed at 8x with no recipe, --resume, then readjust and export."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import requires_testbed, small_search
from longrope_cli.cli.main import cli

SMALL = small_search()


pytestmark = pytest.mark.usefixtures("restore_logging")


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_missing_target_and_factors_are_one_line_errors(tmp_path):
    result = run("search", "--model", "testbed", "--out", str(tmp_path / "s"))
    assert result.exit_code == 2 and "search.target is not set" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = run("readjust", "--model", "testbed", "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "readjust.factors is not set" in result.output
    result = run("search", "--model", "testbed", "--target", "2k", "search.populaton=3")
    assert result.exit_code == 2 and "search.population" in result.output


def test_search_command_on_the_tiny_model(tiny_model_dir, tiny_corpus, tmp_path):
    out = tmp_path / "search"

    def args(max_evals: int, *extra: str) -> list[str]:
        return ["search", "--model", str(tiny_model_dir), "--target", "128", "--out", str(out), "--max-evals",
                str(max_evals), "--no-progress", f"data.corpus={tiny_corpus}", *SMALL, *extra]

    result = run(*args(9))
    assert result.exit_code == 0, result.output
    assert str(out / "factors.json") in result.output and "after 9 evaluations" in result.output
    for name in ("factors.json", "candidates.jsonl", "state.json", "recipe.yaml", "env.json", "log.txt",
                 "complete.json"):
        assert (out / name).is_file(), name
    assert "max_evals: 9" in (out / "recipe.yaml").read_text()
    again = run(*args(9))  # no --resume: refuses to overwrite
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = run(*args(12, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "after 12 evaluations" in resumed.output


@pytest.mark.integration
@requires_testbed
def test_testbed_search_resume_readjust_export(tmp_path):
    search_out = tmp_path / "search-2k"
    base = ["search", "--model", "testbed", "--target", "2k", "--out", str(search_out), "--no-progress", *SMALL,
            "search.start_tokens=0"]
    first = run(*base, "search.iterations=1")
    assert first.exit_code == 0, first.output
    resumed = run(*base, "search.iterations=2", "--resume")
    assert resumed.exit_code == 0, resumed.output
    factors = json.loads((search_out / "factors.json").read_text())
    assert len(factors["long_factor"]) == 32 and factors["target_length"] == 2048
    assert factors["provenance"]["evaluations"] == 8 + 2 * 6  # conftest.SMALL_SEARCH, 2 generations
    readjust_out = tmp_path / "readjust"
    result = run("readjust", "--model", "testbed", "--factors", str(search_out / "factors.json"), "--lengths",
                 "128,256", "--out", str(readjust_out), "--no-progress", "readjust.population=4",
                 "readjust.iterations=1", "readjust.documents=2")
    assert result.exit_code == 0, result.output
    final = json.loads((readjust_out / "factors.json").read_text())
    assert final["long_factor"] == factors["long_factor"] and len(final["short_factor"]) == 32
    exported = run("export", "--model", "testbed", "--factors", str(readjust_out / "factors.json"), "--out",
                   str(tmp_path / "export"))
    assert exported.exit_code == 0, exported.output
    config = json.loads((tmp_path / "export" / "model" / "config.json").read_text())
    assert config["rope_scaling"]["short_factor"] == final["short_factor"]

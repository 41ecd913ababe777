"""Every stage folder holds the same record, under the CLI and under `longrope run`: recipe.yaml, env.json,
log.txt (with every generation's summary), complete.json; transformers' bars stay out; a heartbeat without bars."""

from __future__ import annotations

import logging

import pytest
import yaml
from click.testing import CliRunner

from conftest import small_search, tiny_pipeline_recipe
from longrope_cli.cli.main import cli
from longrope_cli.pipeline import run_pipeline
from longrope_cli.search.engine import _Progress
from longrope_cli.stages import STAGES

RECORD = ("recipe.yaml", "env.json", "log.txt", "complete.json")


pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.mark.integration
def test_every_stage_folder_under_run_has_the_record(tiny_model_dir, tiny_corpus, tmp_path):
    recipe = tiny_pipeline_recipe(tiny_model_dir, tiny_corpus)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    outcomes = run_pipeline(path, out_root=tmp_path / "o", progress=True)
    assert [o.command for o in outcomes] == ["search", "readjust", "eval", "export"]
    for o in outcomes:
        assert all((o.out / name).is_file() for name in RECORD), (o.name, sorted(p.name for p in o.out.iterdir()))
        assert yaml.safe_load((o.out / "recipe.yaml").read_text())["output"]["dir"] == str(o.out)
    search_log = (tmp_path / "o" / "long" / "log.txt").read_text()
    # the live display (progress=True) still leaves every generation's summary in the log file
    assert "search generation 1/1" in search_log
    assert "Loading weights" not in search_log
    assert (tmp_path / "o" / "final" / "model" / "config.json").is_file()
    assert STAGES["export"].writes_factors is False


def test_no_transformers_progress_bars_with_no_progress(tiny_model_dir, tiny_corpus, tmp_path, capfd):
    result = CliRunner().invoke(cli, ["search", "--model", str(tiny_model_dir), "--target", "128", "--out",
                                      str(tmp_path / "s"), "--max-evals", "8", "--no-progress",
                                      f"data.corpus={tiny_corpus}", *small_search()])
    assert result.exit_code == 0, result.output
    captured = capfd.readouterr()
    assert "Loading weights" not in result.output + captured.out + captured.err
    assert "loading model" in (tmp_path / "s" / "log.txt").read_text()


def test_without_bars_a_long_generation_logs_a_heartbeat(caplog):
    progress = _Progress(enabled=False, label="search", total=100, heartbeat=0.0)
    progress.start(10)
    with caplog.at_level(logging.INFO):
        progress.advance(5, 42.5)
        progress.advance(5, float("inf"))
    assert [r.getMessage() for r in caplog.records] == [
        "search: 15/100 evaluations, best perplexity so far 42.5000",
        "search: 20/100 evaluations, best perplexity so far -"]
    quiet = _Progress(enabled=False, label="search", total=100)  # the default: once a minute
    quiet.start(0)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        quiet.advance(5, 42.5)
    assert caplog.records == []


def test_every_command_has_the_same_resume_and_progress_flags():
    import click

    ctx = click.Context(cli)
    for name in STAGES:
        command = cli.get_command(ctx, name)
        opts = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        assert {"--resume", "--no-resume", "--progress", "--no-progress", "--model", "--out", "--device"} <= opts, name
    run = cli.get_command(ctx, "run")
    assert {"--progress", "--no-progress"} <= {o for p in run.params for o in (*p.opts, *p.secondary_opts)}


def test_a_stage_refused_before_open_writes_nothing_and_one_failing_after_logs_why(tmp_path):
    from longrope_cli.errors import RecipeError
    from longrope_cli.recipe import load_recipe
    from longrope_cli.stages.folder import stage_folder

    recipe = load_recipe(None, [])
    with pytest.raises(RecipeError), stage_folder("search", recipe, tmp_path / "refused"):
        logging.getLogger("longrope_cli.test").info("checking inputs")
        raise RecipeError("bad input")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(RecipeError), stage_folder("search", recipe, tmp_path / "failed") as folder:
        logging.getLogger("longrope_cli.test").info("checking inputs")
        folder.open()
        raise RecipeError("the corpus ran out")
    text = (tmp_path / "failed" / "log.txt").read_text()
    assert "checking inputs" in text  # what was logged before the folder opened is kept
    assert "search stopped: the corpus ran out" in text
    assert {p.name for p in (tmp_path / "failed").iterdir()} == {"recipe.yaml", "env.json", "log.txt"}

"""The command line: help with examples everywhere, one-line errors, exit codes, version."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import longrope_calls, longrope_usage_problems
from longrope_cli import __version__
from longrope_cli.cli.main import COMMANDS, cli

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def examples(help_text: str) -> list[list[str]]:
    """The `$ ...` lines of a help text's Examples section, as argv (comments and continuations removed)."""
    assert "Examples:" in help_text, help_text
    text = re.sub(r"\\\n\s*", " ", help_text.split("Examples:", 1)[1])
    return [shlex.split(line.strip()[2:], comments=True) for line in text.splitlines()
            if line.strip().startswith("$ ")]


def test_version_and_group_help():
    assert run("--version").output.strip().endswith(f"longrope, version {__version__}")
    out = run("--help").output
    listing = itertools.takewhile(lambda line: line.startswith("  "), out.split("Commands:\n", 1)[1].splitlines())
    rows = [line.split(None, 1) for line in listing]
    assert [name for name, _ in rows] == list(COMMANDS)  # every command, in order, and nothing else
    assert all(len(text.strip()) > 10 for _, text in rows), rows  # each with its one-line help
    calls = [args for argv in examples(out) for args in longrope_calls(argv)]
    assert len(calls) >= 5 and {args[0] for args in calls} <= set(COMMANDS)
    problems = [p for args in calls for p in longrope_usage_problems(args)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_examples_that_it_accepts(command):
    result = run(command, "--help")
    assert result.exit_code == 0, result.output
    calls = [args for argv in examples(result.output) for args in longrope_calls(argv)]
    assert any(args[0] == command for args in calls), f"no `$ longrope {command} ...` example:\n{result.output}"
    problems = [p for args in calls for p in longrope_usage_problems(args)]
    assert not problems, "\n".join(problems)


def test_recipe_show_validate_fields(tmp_path):
    out = run("recipe", "show", "search.target=256k", "search.population=8")
    assert out.exit_code == 0 and "target: 256k" in out.output and "population: 8" in out.output
    good = tmp_path / "r.yaml"
    good.write_text("search:\n  target: 2k\n")
    assert run("recipe", "validate", str(good)).exit_code == 0
    assert "search.population" in run("recipe", "fields").output


@pytest.mark.parametrize("args,message", [
    (["recipe", "show", "search.populaton=3"], "did you mean 'search.population'"),
    (["recipe", "show", "search.target=4kb"], "search.target"),
    (["recipe", "show", "stray"], "unexpected argument 'stray'"),
    (["recipe", "validate", "missing.yaml"], "not found"),
    (["export", "--model", "testbed", "--factors", "missing.json", "--out", "x"], "factor file"),
])
def test_user_mistakes_are_one_line_errors(args, message):
    result = run(*args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "longrope_cli", "--version"], capture_output=True, text=True,
                         check=True, timeout=60)
    assert __version__ in out.stdout


@pytest.mark.parametrize("override, code, stream, text", [
    ("search.population=8", 0, "stdout", "ok: "),
    ("nosuch.key=1", 2, "stderr", "error: unknown recipe key"),
])
def test_a_rank_under_a_launcher_keeps_its_exit_code_and_output(override, code, stream, text):
    """Under torchrun (WORLD_SIZE > 1) main() leaves with os._exit after Python's exit handlers, skipping torch's
    C++ teardown: the exit status and everything printed must survive that."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run([sys.executable, "-m", "longrope_cli", "recipe", "validate", str(RECIPES / "tiny.yaml"),
                           override], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == code, done.stderr
    assert text in getattr(done, stream)

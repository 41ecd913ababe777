"""`longrope run`: stage order, ${name} folders, override precedence, skip complete / resume partial stages.

The stage functions are stubs here (they record their recipe and write a marker like the real ones);
the real stages run end to end in the integration test of recipes/tiny.yaml (test_recipes.py).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from longrope_cli import pipeline
from longrope_cli.cli.main import cli
from longrope_cli.errors import RecipeError
from longrope_cli.outputs import is_complete, mark_complete
from longrope_cli.recipe import load_recipe
from longrope_cli.stages import STAGES
from longrope_cli.stages.folder import StageResult

RECIPE = {
    "model": {"name": "testbed"},
    "search": {"population": 8, "iterations": 3},
    "eval": {"methods": ["none", "${s2}/factors.json"]},
    "stages": [
        {"name": "s1", "command": "search", "overrides": {"search.target": "2k"}},
        {"name": "ft", "command": "finetune", "overrides": {"finetune.factors": "${s1}", "finetune.target": "2k"}},
        {"name": "s2", "command": "search", "overrides": {
            "model.name": "${ft}/model", "search.target": "16k", "search.base_factors": "${ft}"}},
        {"name": "ev", "command": "eval", "overrides": {"model.name": "${ft}/model", "eval.lengths": [256, "16k"]}},
    ],
}


def write_recipe(tmp_path: Path, data: dict | None = None) -> Path:
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(data or RECIPE, sort_keys=False), encoding="utf-8")
    return path


class Stubs:
    """Stage functions that record their calls; `fail` names a stage that dies half-way."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: str | None = None) -> None:
        self.calls: list[tuple[str, object, bool]] = []
        self.fail = fail
        self.runners = {command: self._stub(command) for command in STAGES}

    def _stub(self, command: str):
        def run(recipe, out_dir, *, resume=False, progress=True, **kwargs):
            out = Path(out_dir)
            self.calls.append((out.name, recipe, resume))
            out.mkdir(parents=True, exist_ok=True)
            (out / "partial.txt").write_text("started")
            if out.name == self.fail:
                raise KeyboardInterrupt  # a kill in the middle of the stage
            (out / "factors.json").write_text("{}")
            mark_complete(out, command, out / "factors.json", best_perplexity=12.5)
            return StageResult(stage=command, out=out, artifact=out / "factors.json")
        return run

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]

    def recipe(self, name: str):
        return next(r for n, r, _ in self.calls if n == name)


def test_stages_run_in_order_with_their_folders(tmp_path, monkeypatch):
    stubs = Stubs(monkeypatch)
    root = tmp_path / "out"
    outcomes = pipeline.run_pipeline(write_recipe(tmp_path), out_root=root, progress=False, runners=stubs.runners)
    assert stubs.names == ["s1", "ft", "s2", "ev"]
    assert [o.status for o in outcomes] == ["ran"] * 4
    ft, s2, ev = stubs.recipe("ft"), stubs.recipe("s2"), stubs.recipe("ev")
    assert ft.finetune.factors == str(root / "s1") and ft.finetune.target == 2048
    assert s2.model.name == str(root / "ft" / "model") and s2.search.base_factors == str(root / "ft")
    assert s2.search.target == 16384 and stubs.recipe("s1").search.target == 2048
    assert ev.eval.methods == ["none", str(root / "s2" / "factors.json")]  # ${} in a section, not a stage
    assert ev.eval.lengths == [256, 16384]
    assert all(r.search.population == 8 for _, r, _ in stubs.calls)
    assert all(r.output.dir == str(root / name) for name, r, _ in stubs.calls)
    assert all(is_complete(root / name) for name in stubs.names)
    summary = json.loads((root / "pipeline.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["s1", "ft", "s2", "ev"]
    assert summary["stages"][0]["best_perplexity"] == 12.5


def test_default_root_is_runs_recipe_stem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root, plan = pipeline.plan_pipeline(write_recipe(tmp_path))
    assert root == Path("runs") / "demo"
    assert [s.out for s in plan] == [Path("runs/demo") / n for n in ("s1", "ft", "s2", "ev")]
    root, _ = pipeline.plan_pipeline(write_recipe(tmp_path), ["output.dir=elsewhere"])
    assert root == Path("elsewhere")


def test_killed_pipeline_skips_complete_and_resumes_partial(tmp_path, monkeypatch):
    recipe, root = write_recipe(tmp_path), tmp_path / "out"
    stubs = Stubs(monkeypatch, fail="ft")
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(recipe, out_root=root, progress=False, runners=stubs.runners)
    assert stubs.names == ["s1", "ft"]
    assert is_complete(root / "s1") and not is_complete(root / "ft")

    stubs = Stubs(monkeypatch)
    outcomes = pipeline.run_pipeline(recipe, out_root=root, progress=False, runners=stubs.runners)
    assert stubs.names == ["ft", "s2", "ev"]  # s1 is not run again
    assert [resume for _, _, resume in stubs.calls] == [True, False, False]
    assert [o.status for o in outcomes] == ["skipped", "resumed", "ran", "ran"]

    stubs = Stubs(monkeypatch)
    pipeline.run_pipeline(recipe, out_root=root, progress=False, runners=stubs.runners)
    assert stubs.names == []  # everything complete


def test_override_precedence(tmp_path, monkeypatch):
    stubs = Stubs(monkeypatch)
    overrides = ["search.population=4", "search.target=4k", "s2.search.iterations=1", "ft.finetune.target=1k"]
    pipeline.run_pipeline(write_recipe(tmp_path), overrides, out_root=tmp_path / "o", progress=False,
                          runners=stubs.runners)
    s1, s2, ft = stubs.recipe("s1"), stubs.recipe("s2"), stubs.recipe("ft")
    assert s1.search.population == s2.search.population == 4  # command line beats the sections
    # ... and the stages' own overrides: they are part of the recipe file (defaults < recipe < key=value)
    assert s1.search.target == s2.search.target == 4096
    assert ft.finetune.target == 1024  # a command-line override addressed to one stage beats them all
    assert s2.search.iterations == 1 and s1.search.iterations == 3


def test_a_stage_that_returns_without_its_completion_marker_fails_the_pipeline(tmp_path, monkeypatch):
    stubs = Stubs(monkeypatch)

    def forgetful(recipe, out_dir, *, resume=False, progress=True):
        return StageResult(stage="eval", out=Path(out_dir), artifact=Path(out_dir) / "results.json")

    with pytest.raises(RuntimeError, match="without writing complete.json"):
        pipeline.run_pipeline(write_recipe(tmp_path), out_root=tmp_path / "o", progress=False,
                              runners={**stubs.runners, "eval": forgetful})
    assert not is_complete(tmp_path / "o" / "ev") and is_complete(tmp_path / "o" / "s2")


def test_export_stage_takes_the_previous_factors(tmp_path, monkeypatch):
    stubs = Stubs(monkeypatch)
    seen = {}

    def export(recipe, out_dir, *, resume=False, progress=True):
        seen["factors"] = recipe.export.factors
        mark_complete(out_dir, "export", Path(out_dir))
        return StageResult(stage="export", out=Path(out_dir), artifact=Path(out_dir))

    data = {**RECIPE, "stages": RECIPE["stages"] + [{"name": "final", "command": "export"}]}
    pipeline.run_pipeline(write_recipe(tmp_path, data), out_root=tmp_path / "o", progress=False,
                          runners={**stubs.runners, "export": export})
    assert seen["factors"] == str(tmp_path / "o" / "s2" / "factors.json")  # the last stage that writes factors
    assert stubs.names[-1] == "ev"


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["stages"][1]["overrides"].update({"finetune.factors": "${nope}"}), "names no stage"),
    (lambda d: d["stages"][0]["overrides"].update({"search.base_factors": "${ft}"}), "does not run before"),
    (lambda d: d["stages"][2].update({"name": "s1"}), "two stages are named 's1'"),
    (lambda d: d["stages"][1]["overrides"].update({"finetune.stepz": 3}), "stage 'ft': unknown recipe key"),
    (lambda d: d["stages"][0].update({"name": "search"}), "not a recipe section"),
    (lambda d: d.update({"stages": []}), "has no stages"),
])
def test_recipe_mistakes_are_one_line_errors_before_anything_runs(tmp_path, monkeypatch, change, message):
    stubs = Stubs(monkeypatch)
    data = json.loads(json.dumps(RECIPE))
    change(data)
    with pytest.raises(RecipeError, match=message):
        pipeline.run_pipeline(write_recipe(tmp_path, data), out_root=tmp_path / "o", progress=False,
                              runners=stubs.runners)
    assert stubs.names == []


def test_dry_run_commands_rebuild_each_stage_recipe(tmp_path, monkeypatch):
    recipe, root = write_recipe(tmp_path), tmp_path / "o"
    (root / "s1").mkdir(parents=True)
    mark_complete(root / "s1", "search", root / "s1")
    (root / "ft").mkdir()
    (root / "ft" / "partial.txt").write_text("x")
    result = CliRunner().invoke(cli, ["run", str(recipe), "--out", str(root), "--dry-run", "s2.search.iterations=1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    commands = [shlex.split(line) for line in lines if line.startswith("longrope ")]
    assert [c[1] for c in commands] == ["finetune", "search", "eval"]  # s1 is complete: commented out
    assert any(line.startswith("# longrope search") for line in lines)
    assert "output.resume=true" in commands[0]  # ft was started: its command resumes
    _, plan = pipeline.plan_pipeline(recipe, ["s2.search.iterations=1"], out_root=root)
    for argv, stage in zip(commands, plan[1:], strict=True):
        args = [a for a in argv[3:] if "=" in a]
        out = argv[argv.index("--out") + 1]
        rebuilt = load_recipe(argv[2], args, {"output.dir": out})
        expected = stage.recipe
        rebuilt.stages = []  # a stage runs with the sections only
        assert rebuilt.output.resume == (stage.status == "resume")
        rebuilt.output.resume = False
        assert rebuilt == expected


def test_run_help_has_examples():
    result = CliRunner().invoke(cli, ["run", "--help"])
    assert result.exit_code == 0 and "$ longrope run recipes/tiny.yaml" in result.output

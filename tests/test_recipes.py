"""Every shipped recipe validates and plans; the SLURM scripts print what they would launch; and
(integration) `longrope run recipes/tiny.yaml`, shrunk to a couple of minutes, runs end to end."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import requires_testbed
from longrope_cli.outputs import is_complete
from longrope_cli.pipeline import plan_pipeline, run_pipeline
from longrope_cli.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SLURM = ROOT / "scripts" / "slurm"
CLI = f"{shlex.quote(sys.executable)} -m longrope_cli"


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {"tiny.yaml", "llama2-7b-2m.yaml", "mistral-7b-2m.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_and_plans(path, tmp_path):
    recipe = load_recipe(path)
    assert recipe.stages, "a shipped recipe lists its stages"
    root, plan = plan_pipeline(path, out_root=tmp_path)
    assert [s.name for s in plan] == [s.name for s in recipe.stages]
    assert all(s.status == "run" and s.out == tmp_path / s.name for s in plan)
    assert "${" not in json.dumps([str(s.recipe) for s in plan])  # every reference resolved
    finetunes = [s for s in plan if s.command == "finetune"]
    assert all(s.recipe.finetune.factors for s in finetunes)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_header_shows_how_to_launch_it(path):
    text = path.read_text(encoding="utf-8")
    header = text[:text.index("\n\n")]
    assert f"$ longrope run recipes/{path.name}" in header or f"make recipe-{path.stem}" in header
    if path.name != "tiny.yaml":
        assert "$ torchrun --nproc-per-node" in header and "scripts/slurm/launch.sh" in header
    assert "/work/" not in text and "/home/" not in text  # no paths of one machine


# The paper's settings (LongRoPE section 4 and appendix), per stage: what each planned stage will really run
# with once the recipe's sections, its stage overrides, ${stage} folders and the search's size resolution apply.
PAPER_SEARCH = {"iterations": 40, "mutation_prob": 0.3, "population": 64, "mutations": 16, "crossovers": 16,
                "documents": 5}
PAPER_SEARCH_ABOVE_512K = {**PAPER_SEARCH, "population": 32, "mutations": 8, "crossovers": 8, "documents": 3}
PAPER_FINETUNE = {  # recipe: stage -> (lr, schedule, global batch, steps, training length, factors from, model from)
    "llama2-7b-2m.yaml": {"finetune-128k": (2e-5, "linear", 32, 400, 128 * 1024, "search-128k", None),
                          "finetune-256k": (2e-5, "linear", 32, 600, 256 * 1024, "search-256k", "finetune-128k")},
    "mistral-7b-2m.yaml": {"finetune-128k": (1e-6, "constant", 64, 400, 16 * 1024, "search-128k", None),
                           "finetune-256k": (1e-6, "constant", 64, 400, 16 * 1024, "search-256k", None)},
}


def planned(name: str, tmp_path: Path) -> dict:
    _, plan = plan_pipeline(ROOT / "recipes" / name, out_root=tmp_path)
    return {stage.name: stage for stage in plan}


@pytest.mark.parametrize("name", sorted(PAPER_FINETUNE))
def test_every_stage_runs_the_papers_settings(name, tmp_path):
    from longrope_cli.search.problem import resolve_search

    stages = planned(name, tmp_path)
    searches = {n: s for n, s in stages.items() if s.command == "search"}
    assert sorted(searches) == ["search-128k", "search-2048k", "search-256k"]
    for stage_name, stage in searches.items():
        cfg = stage.recipe.search
        paper = PAPER_SEARCH_ABOVE_512K if cfg.target > 512 * 1024 else PAPER_SEARCH
        resolved = resolve_search(cfg, cfg.target)
        assert {k: getattr(resolved, k) for k in paper} == paper, stage_name
        # the recipe's explicit sizes are the ones the search would pick by itself for that target
        left_null = replace(cfg, population=None, mutations=None, crossovers=None, documents=None)
        assert {k: getattr(resolve_search(left_null, cfg.target), k) for k in paper} == paper, stage_name
    final = searches["search-2048k"].recipe
    assert final.search.target == 2048 * 1024
    assert final.search.base_factors == str(tmp_path / "finetune-256k")  # progressive: relative to the 256k model
    assert final.model.name == str(tmp_path / "finetune-256k" / "model")
    for stage_name, (lr, schedule, batch, steps, length, factors, model) in PAPER_FINETUNE[name].items():
        ft = stages[stage_name].recipe
        assert (ft.finetune.lr, ft.finetune.schedule, ft.finetune.batch_size, ft.finetune.steps,
                ft.finetune.target) == (lr, schedule, batch, steps, length), stage_name
        assert ft.finetune.factors == str(tmp_path / factors), stage_name
        if model is not None:
            assert ft.model.name == str(tmp_path / model / "model"), stage_name


@pytest.mark.parametrize("name", ["tiny.yaml", "llama2-7b-2m.yaml", "mistral-7b-2m.yaml"])
def test_progressive_searches_keep_the_fine_tuned_temperature(name, tmp_path):
    """A search on a fine-tuned model (search.base_factors) keeps the attention factor the model was trained with
    (README: "the fine-tuned model learns the temperature and the progressive stages keep it")."""
    progressive = [s for s in planned(name, tmp_path).values() if s.command == "search" and s.recipe.search.base_factors]
    assert progressive
    assert all(s.recipe.search.attention == "base" for s in progressive), \
        {s.name: s.recipe.search.attention for s in progressive}


def bash(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("script", "expected"), [
    ("finetune.sbatch", "torchrun --nnodes 3 --nproc-per-node 4"),
    ("search.sbatch", "-m longrope_cli search search.backend=distributed recipes/tiny.yaml"),
    ("eval.sbatch", "-m longrope_cli eval recipes/tiny.yaml"),
])
def test_sbatch_dry_run_prints_the_launch_command(script, expected):
    done = bash(str(SLURM / script), "recipes/tiny.yaml", "--out", "runs/x",
                env={"DRY_RUN": "1", "SLURM_NNODES": "3", "GPUS_PER_NODE": "4", "SLURM_RESTART_COUNT": "1"})
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout and done.stdout.startswith("srun ")
    assert done.stdout.strip().endswith("output.resume=true")  # a requeued job resumes


def test_launch_dry_run_chains_one_job_per_stage(tmp_path):
    done = bash(str(SLURM / "launch.sh"), "--dry-run", "--nodes", "4", "recipes/tiny.yaml", f"output.dir={tmp_path}",
                env={"LONGROPE": CLI})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    stages = [s.name for s in load_recipe(ROOT / "recipes" / "tiny.yaml").stages]
    assert len(lines) == len(stages)
    assert "--dependency" not in lines[0] and all(f"afterok:\\$JOB_{i}" in lines[i] for i in range(1, len(lines)))
    finetune = next(line for line in lines if "finetune.sbatch" in line)
    assert "--nodes 4" in finetune and "--out " + str(tmp_path / "finetune-2k") in finetune
    assert "LONGROPE_STAGE=readjust" in next(line for line in lines if "readjust-256" in line)
    # a complete stage is not submitted again
    (tmp_path / "search-2k").mkdir(parents=True)
    (tmp_path / "search-2k" / "complete.json").write_text("{}")
    again = bash(str(SLURM / "launch.sh"), "--dry-run", "recipes/tiny.yaml", f"output.dir={tmp_path}",
                 env={"LONGROPE": CLI})
    assert len(again.stdout.strip().splitlines()) == len(stages) - 1


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_recipe_targets():
    for target, recipe in (("recipe-tiny", "recipes/tiny.yaml"), ("recipe-llama2-2m", "recipes/llama2-7b-2m.yaml")):
        done = subprocess.run(["make", "-n", target], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert done.returncode == 0 and f"longrope run {recipe}" in done.stdout, done.stderr


SHRINK = [  # the whole tiny pipeline in about two minutes: same stages, tiny sizes
    "search.population=4", "search.iterations=1", "search.mutations=2", "search.crossovers=2",
    "search.survivors=2", "search.documents=1",
    "finetune.steps=2", "finetune.batch_size=1", "finetune.warmup_steps=1",
    "search-16k.search.target=4k", "search-16k.search.population=2", "search-16k.search.iterations=1",
    "search-16k.search.mutations=1", "search-16k.search.crossovers=1", "search-16k.search.survivors=2",
    "readjust.population=4", "readjust.iterations=1", "readjust.documents=1",
    "eval.documents=1", "eval.lengths=[256,4k]", "eval-base.eval.lengths=[256,2k]", "eval.passkey_lengths=[256]",
    "eval.passkey_depths=[0.5]", "eval.passkey_trials=1", "eval.plots=false",
]


@pytest.mark.integration
@requires_testbed
def test_tiny_recipe_end_to_end(tmp_path):
    root = tmp_path / "tiny"
    outcomes = run_pipeline(ROOT / "recipes" / "tiny.yaml", SHRINK + [f"data.cache_dir={tmp_path / 'cache'}"],
                            out_root=root, progress=False)
    names = [s.name for s in load_recipe(ROOT / "recipes" / "tiny.yaml").stages]
    assert [o.name for o in outcomes] == names and all(o.status == "ran" for o in outcomes)
    assert all(is_complete(root / n) for n in names)
    assert (root / "finetune-2k" / "model" / "config.json").is_file()
    searched = json.loads((root / "search-16k" / "factors.json").read_text())
    tuned = json.loads((root / "finetune-2k" / "factors.json").read_text())
    assert searched["target_length"] == 4096 and tuned["target_length"] == 2048
    readjusted = json.loads((root / "readjust-256" / "factors.json").read_text())
    assert readjusted["short_factor"] and readjusted["long_factor"] == searched["long_factor"]
    assert (root / "eval-16k" / "results.json").is_file()
    again = run_pipeline(ROOT / "recipes" / "tiny.yaml", SHRINK, out_root=root, progress=False)
    assert all(o.status == "skipped" for o in again)

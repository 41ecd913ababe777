"""The wheel works as the README says, installed outside the checkout: bundled recipes, `longrope run NAME`,
a search on the bundled test bed, its export loaded by plain transformers, and no git revision in env.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    """The package built as a wheel and installed into a folder of its own (first on PYTHONPATH, so it shadows
    the checkout's editable install; torch and transformers come from this environment)."""
    build = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(build), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Package would be ignored" not in done.stderr  # every subpackage is packaged
    wheel = next(build.glob("longrope_cli-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("longrope_cli/stages/search.py", "longrope_cli/recipes/tiny.yaml",
                   "longrope_cli/assets/testbed/config.json", "longrope_cli/assets/corpus-jargon/README.md"):
        assert any(n == needed or n.startswith(needed) for n in names), needed
    site = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return site


def longrope(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "longrope_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_wheel_runs_the_readme_outside_the_checkout(wheel_site, tmp_path):
    where = longrope(wheel_site, tmp_path, "recipe", "ls")
    assert where.returncode == 0 and "tiny" in where.stdout, where.stderr
    plan = longrope(wheel_site, tmp_path, "run", "tiny", "--dry-run")
    assert plan.returncode == 0 and "longrope search tiny" in plan.stdout, plan.stderr
    copied = longrope(wheel_site, tmp_path, "recipe", "cp", "tiny", "mine.yaml")
    assert copied.returncode == 0 and (tmp_path / "mine.yaml").is_file(), copied.stderr
    search = longrope(wheel_site, tmp_path, "search", "--model", "testbed", "--target", "512", "--out",
                      "runs/search-512", "--max-evals", "6", "--no-progress", "search.start_tokens=0",
                      "search.population=6", "search.survivors=3", "search.mutations=2", "search.crossovers=2",
                      "search.documents=1", "search.attention_search=false")
    assert search.returncode == 0, search.stderr[-4000:]
    env = json.loads((tmp_path / "runs" / "search-512" / "env.json").read_text())
    assert env["git_revision"] == "unknown"  # installed, not a source checkout
    exported = longrope(wheel_site, tmp_path, "export", "--model", "testbed", "--factors",
                        "runs/search-512/factors.json", "--out", "runs/testbed-512")
    assert exported.returncode == 0, exported.stderr[-4000:]
    check = subprocess.run([sys.executable, "-c", "from transformers import AutoModelForCausalLM as M; "
                            "print(M.from_pretrained('runs/testbed-512/model').config.rope_scaling['rope_type'])"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert check.stdout.strip() == "longrope", check.stderr[-4000:]

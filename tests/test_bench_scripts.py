"""The benchmark scripts still run against the library they measure (their numbers are for the README, never
asserted as timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_testbed

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
@requires_testbed
def test_finetune_memory_bench_runs_the_trainer_on_small_shapes(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "scripts/bench_finetune_memory.py"), "--device", "cpu", "--hidden", "64",
               "--intermediate", "172", "--heads", "2", "--vocab", "2048", "--lengths", "512", "--layers", "1,2",
               "--chunk", "128", "--dtypes", "float32", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["layers"], r["length"]) for r in rows] == [(1, 512), (2, 512)]
    assert rows[1]["params"] > rows[0]["params"] and all(5.0 < r["loss"] < 9.0 for r in rows)  # ~ln(2048) untrained


@pytest.mark.integration
@requires_testbed
def test_quality_bench_scores_searches_through_plain_transformers_and_resumes(tmp_path):
    command = [sys.executable, str(ROOT / "scripts/bench_quality.py"), "--target", "512", "--rows", "yarn,paper",
               "--seeds", "0", "--evals", "6", "--eval-windows", "2", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores) == {"512 yarn", "512-paper-6 seed0"}
    assert (tmp_path / "exports" / "512-paper-6-0" / "config.json").is_file()  # scored as an export
    assert "| paper (6) |" in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and "== search" not in again.stdout  # everything reused
    assert json.loads((tmp_path / "scores.json").read_text()) == scores


@pytest.mark.integration
def test_scoring_memory_bench_measures_every_path_on_the_same_loss(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "scripts/bench_eval_memory.py"), "--model", "random", "--vocab", "512",
               "--lengths", "512", "--paths", "layerwise,full", "--chunk", "128", "--repeats", "1",
               "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["path"] for r in rows] == ["layerwise", "full"]
    assert all(r["extra"] > 0 and r["seconds"] > 0 and r["matmul"] > 0 for r in rows)
    assert max(r["loss"] for r in rows) - min(r["loss"] for r in rows) < 1e-4  # one window, two exact paths
    assert "of matmul" in done.stdout

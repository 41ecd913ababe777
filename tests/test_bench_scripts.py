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

"""`longrope eval` end to end on the bundled test-bed model (integration tier: `make test`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_testbed

pytestmark = [pytest.mark.integration, requires_testbed]


def longrope(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "longrope_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300, check=False)


@pytest.fixture(scope="module")
def hand_factors(tmp_path_factory) -> Path:
    """A non-uniform factor file for the test bed (long factors ramp 1 -> 4.5, short factors 1)."""
    from longrope_cli.models import load_model
    from longrope_cli.rope.factors import FactorSet

    layout = load_model("testbed", device="cpu").layout
    path = tmp_path_factory.mktemp("factors") / "hand-4x" / "factors.json"
    ramp = [1.0 + 3.5 * i / (layout.pairs - 1) for i in range(layout.pairs)]
    FactorSet(long_factor=ramp, short_factor=[1.0] * layout.pairs, target_length=4 * layout.original_length,
              attention=1.1, attention_policy="su").save(path, layout)
    return path


def test_eval_without_recipe_writes_results_plots_and_table(tmp_path, hand_factors):
    out = tmp_path / "eval"
    done = longrope("eval", "--model", "testbed", "--lengths", "256,1k", "--methods", f"none,pi,yarn,{hand_factors}",
                    "--documents", "2", "--passkey-lengths", "256", "--passkey-trials", "2", "--no-progress",
                    "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in results["methods"]] == ["none", "pi", "yarn", "hand-4x"]
    ppl = {(c["method"], c["length"]): c["perplexity"] for c in results["perplexity"]}
    assert len(ppl) == 8
    # at the original window the baselines are plain RoPE
    assert ppl[("none", 256)] == pytest.approx(ppl[("pi", 256)]) and ppl[("yarn", 256)] == pytest.approx(ppl[("pi", 256)])
    # a trained model: plain RoPE at 4x extrapolates worse than at 1x
    assert ppl[("none", 1024)] > ppl[("none", 256)]
    assert {p["depth"] for p in results["passkey"]} == {0.0, 0.25, 0.5, 0.75, 1.0}
    for name in ("ppl_vs_length.png", "passkey.png", "factors.png", "recipe.yaml", "env.json", "log.txt",
                 "complete.json"):
        assert (out / name).is_file(), name
    assert "Perplexity" in done.stdout and "hand-4x" in done.stdout and "results:" in done.stdout

    again = longrope("eval", "--model", "testbed", "--lengths", "256,1k", "--methods",
                     f"none,pi,yarn,{hand_factors}", "--documents", "2", "--passkey-lengths", "256",
                     "--passkey-trials", "2", "--no-progress", "--resume", "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "complete.json").read_text())["reused"] == 12  # 8 perplexity + 4 passkey cells
    assert json.loads((out / "results.json").read_text())["perplexity"] == results["perplexity"]


def test_eval_reads_the_recipe_eval_section_and_flags_win(tmp_path):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text("model:\n  name: testbed\neval:\n  lengths: [256, 512]\n  methods: [none, ntk]\n"
                      "  documents: 3\n  mode: sliding\n  plots: false\n")
    out = tmp_path / "eval"
    done = longrope("eval", str(recipe), "eval.sliding_tokens=1k", "--documents", "1", "--no-progress",
                    "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["provenance"]["recipe"]["eval"]["documents"] == 1  # flag beats recipe
    cells = {(c["method"], c["length"]): c for c in results["perplexity"]}
    assert set(cells) == {("none", 256), ("ntk", 256), ("none", 512), ("ntk", 512)}
    assert all(c["tokens"] == 1023 for c in cells.values())  # sliding: every token of a 1k span once
    assert not (out / "ppl_vs_length.png").exists()


def test_eval_errors_are_one_line(tmp_path):
    bad = longrope("eval", "--model", "testbed", "--methods", "none,yarnn", "--out", str(tmp_path / "x"),
                   cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("error: unknown method 'yarnn': did you mean 'yarn'? use none, pi, ntk, "
                                  "dynamic-ntk, yarn or a factor file (.json / .csv)")
    missing = longrope("eval", "--model", "testbed", "--methods", "none,nowhere/factors.json", "--lengths", "256",
                       "--out", str(tmp_path / "y"), cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "not found" in missing.stderr

"""The torch.distributed evaluator: 2 gloo ranks under torchrun give the same search as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import small_search
from longrope_cli.models import load_model
from longrope_cli.recipe import load_recipe
from longrope_cli.stages.search import run_search

SEARCH = small_search(iterations=2, racing=True, seed=3,
                      # what runs after the evolution is spread over the ranks too (rank 0 alone would idle the others)
                      validate_top=3, validate_documents=2, attention_search=True, attention_search_evals=4)


RANK_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
            "PYTHONFAULTHANDLER": "1"}  # a rare exit -6 at teardown (README, known issue): show the Python stacks


def torchrun_search(model_dir, out, ranks: int, overrides: list[str]) -> tuple[list[str], dict]:
    """(command, environment) of a `longrope search` at 256 tokens over `ranks` gloo CPU ranks."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "longrope_cli", "search", "--model", str(model_dir), "--device", "cpu", "--target", "256",
               "--out", str(out), "--no-progress", *overrides, "search.backend=distributed",
               "parallel.dist_backend=gloo"]
    return command, {**os.environ, **RANK_ENV}


def run_ranks(command: list[str], env: dict, timeout: float, tmp_path: Path) -> subprocess.CompletedProcess:
    """torchrun, stopped on a timeout as a scheduler stops it (SIGTERM: torchrun ends its ranks), so a hang fails
    the test without leaving ranks behind. Output goes to files: a stray rank holding a pipe cannot block us."""
    logs = [tmp_path / "ranks.out", tmp_path / "ranks.err"]
    with logs[0].open("w") as out, logs[1].open("w") as err:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            pytest.fail(f"ranks still running after {timeout} s (a hang?):\n{logs[1].read_text()[-4000:]}")
    stdout, stderr = (log.read_text() for log in logs)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def one_process_search(model_dir, tmp_path, overrides: list[str]):
    """The same search in this process, on one thread as each rank ran: the same arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm = load_model(str(model_dir), device="cpu")
        recipe = load_recipe(None, [f"model.name={model_dir}", "search.target=256", *overrides])
        return run_search(recipe, tmp_path / "local", lm=lm, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_two_gloo_ranks_match_the_local_search(tiny_model_dir, tiny_corpus, tmp_path):
    common = [f"data.corpus={tiny_corpus}", *SEARCH]
    out = tmp_path / "dist"
    command, env = torchrun_search(tiny_model_dir, out, 2, common)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    assert "rank 1 of 2: scored" in output and "scored 0 candidates" not in output, output[-8000:]

    local = one_process_search(tiny_model_dir, tmp_path, common)
    distributed = json.loads((out / "factors.json").read_text())
    assert distributed["provenance"]["ranks"] == 2
    assert distributed["long_factor"] == list(local.best.long_factor)
    assert distributed["start_tokens"] == local.best.start_tokens
    assert distributed["provenance"]["perplexity"] == local.best.provenance["perplexity"]
    assert distributed["provenance"]["evaluations"] == local.evaluations
    assert distributed["attention"]["factor"] == local.best.attention
    assert distributed["provenance"]["validation"] == local.best.provenance["validation"]
    dist_log = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    local_log = [json.loads(line) for line in (tmp_path / "local" / "candidates.jsonl").read_text().splitlines()]
    strip = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in dist_log] == \
        [{k: v for k, v in r.items() if k not in strip} for r in local_log]


def test_context_parallel_groups_score_each_candidate_together_and_match_the_local_search(
        tiny_model_dir, tiny_corpus, tmp_path):
    """4 gloo ranks as 2 groups of 2 (parallel.context_parallel=2): each group scores its candidates with the
    window split over its two ranks; the search is the single-process one."""
    common = [f"data.corpus={tiny_corpus}", *small_search(iterations=2, seed=3, validate_top=2,
                                                          validate_documents=1)]
    out = tmp_path / "cp"
    command, env = torchrun_search(tiny_model_dir, out, 4, [*common, "parallel.context_parallel=2"])
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    flat = " ".join(output.split())  # the log wraps lines
    assert "rank 3: scores each window with ranks 2..3 (context parallel 2)" in flat, output[-8000:]
    assert "scored 0 candidates" not in flat and "rank 2 of 4: scored" in flat, output[-8000:]

    local = one_process_search(tiny_model_dir, tmp_path, ["model.scoring=layerwise", *common])
    shared = json.loads((out / "factors.json").read_text())
    assert shared["provenance"]["context_parallel"] == 2
    assert shared["long_factor"] == list(local.best.long_factor)
    assert shared["provenance"]["evaluations"] == local.evaluations
    assert shared["provenance"]["perplexity"] == pytest.approx(local.best.provenance["perplexity"], rel=1e-5)


def test_context_parallel_without_distributed_ranks_is_a_one_line_error(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "longrope_cli", "search", "--model", str(tiny_model_dir),
                           "--target", "256", "--out", str(tmp_path / "s"), "parallel.context_parallel=2"],
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: parallel.context_parallel=2 shares each window among torchrun ranks: set search.backend=distributed "
        "and launch with torchrun --nproc-per-node a multiple of it"], proc.stderr
    assert not (tmp_path / "s").exists()


def test_a_context_parallel_group_resumes_the_boundary_sweep_in_lockstep(tiny_model_dir, tiny_corpus, tmp_path):
    """Rank 0 holds the stored boundary scores (critical.json); its group peer must skip them too, or the two
    wait for each other in different collectives forever."""
    common = [f"data.corpus={tiny_corpus}", *small_search(iterations=1, seed=5), "search.critical_dim=search"]
    out = tmp_path / "cp"
    command, env = torchrun_search(tiny_model_dir, out, 2, [*common, "parallel.context_parallel=2"])
    first = run_ranks(command, env, 300, tmp_path)
    assert first.returncode == 0, (first.stdout + first.stderr)[-8000:]
    stored = json.loads((out / "critical.json").read_text())["scores"]
    assert stored
    for name in os.listdir(out):  # keep only the boundary scores: the resume starts the evolution afresh
        if name != "critical.json" and (out / name).is_file():
            (out / name).unlink()
    again = run_ranks([*command, "--resume"], env, 120, tmp_path)
    assert again.returncode == 0, (again.stdout + again.stderr)[-8000:]
    assert json.loads((out / "critical.json").read_text())["scores"] == stored
    assert json.loads((out / "factors.json").read_text())["provenance"]["critical_dim_search"]

"""`run_search` end to end on the tiny random Llama (original window 64): files, cache, NaN, racing, budgets,
progressive mode, and a search killed with SIGKILL at a random moment that resumes to the same factors."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import small_search
from longrope_cli.errors import RecipeError
from longrope_cli.evaluate.perplexity import score_perplexity
from longrope_cli.models import load_model
from longrope_cli.outputs import is_complete
from longrope_cli.recipe import load_recipe
from longrope_cli.rope.baselines import pi_factors, yarn_relative_factors
from longrope_cli.rope.factors import load_factors
from longrope_cli.rope.rotary import installed_factors
from longrope_cli.search import state as state_module
from longrope_cli.stages.search import run_search

TARGET = 256  # 4x the tiny model's window

SMALL = small_search(iterations=3, attention_search=False)


def recipe_for(model_dir: Path, corpus: Path, *overrides: str, target: int = TARGET):
    return load_recipe(None, [f"model.name={model_dir}", "model.device=cpu", f"data.corpus={corpus}",
                              f"search.target={target}", *SMALL, *overrides])


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]


def keys(records: list[dict]) -> list[tuple]:
    return [(tuple(r["idx"]), r["start_tokens"]) for r in records]


class CountingScorer(list):
    """A perplexity scorer (pass it as run_search's `scorer`) that records every factor set it really scores:
    one entry per candidate (its windows are scored in a row with the same installed factor set)."""

    def __call__(self, model, window, **kwargs):
        factors = installed_factors(model)
        if not self or self[-1] is not factors:
            self.append(factors)
        return score_perplexity(model, window, **kwargs)


@pytest.fixture
def count_scores():
    return CountingScorer()


def test_small_search_end_to_end(lm, tiny_model_dir, tiny_corpus, tmp_path, count_scores):
    result = run_search(recipe_for(tiny_model_dir, tiny_corpus), tmp_path, lm=lm, progress=False,
                        scorer=count_scores)
    assert result.factors_path == tmp_path / "factors.json"
    loaded = load_factors(result.factors_path, lm.layout, target_length=TARGET)
    assert len(loaded.long_factor) == lm.layout.pairs == 16
    assert all(a <= b for a, b in zip(loaded.long_factor, loaded.long_factor[1:], strict=False))
    assert min(loaded.long_factor) >= 1.0 and max(loaded.long_factor) <= 1.25 * 4 + 1e-9
    assert loaded.start_tokens in (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)
    prov = loaded.provenance
    assert prov["stage"] == "search" and prov["status"] == "complete" and prov["target"] == TARGET
    assert prov["evaluations"] == result.evaluations == len(count_scores) == 8 + 3 * 6
    assert math.isclose(prov["perplexity"], result.best_perplexity)
    assert is_complete(tmp_path) and (tmp_path / "state.json").is_file()
    records = read_log(tmp_path)
    assert len(records) == result.evaluations
    assert result.best_perplexity == min(r["perplexity"] for r in records)
    assert result.best_perplexity <= min(result.seed_perplexity.values())
    assert set(result.seed_perplexity) == {"pi", "ntk", "yarn"}
    assert [h["generation"] for h in result.history] == [0, 1, 2, 3]
    assert installed_factors(lm.model) is None  # the caller's model is given back as it was


def test_a_candidate_is_never_scored_twice(lm, tiny_model_dir, tiny_corpus, tmp_path, count_scores):
    # A small grid (step 0.5: 9 levels, n-hat fixed) forces the evolution to meet old candidates again.
    recipe = recipe_for(tiny_model_dir, tiny_corpus, "search.factor_step=0.5", "search.start_tokens=0",
                        "search.iterations=6")
    first = run_search(recipe, tmp_path, lm=lm, progress=False, scorer=count_scores)
    scored = [(fs.long_factor, fs.start_tokens) for fs in count_scores]
    assert len(scored) == len(set(scored)) == first.evaluations
    assert first.counters["requested"] >= first.evaluations
    assert first.counters["duplicates"] > 0  # old candidates were drawn, and redrawn instead of rescored
    # Resuming with more generations scores only new candidates, and the log holds each candidate once.
    more = load_recipe(None, [f"model.name={tiny_model_dir}", "model.device=cpu", f"data.corpus={tiny_corpus}",
                              f"search.target={TARGET}", *SMALL, "search.factor_step=0.5", "search.start_tokens=0",
                              "search.iterations=9"])
    second = run_search(more, tmp_path, lm=lm, resume=True, progress=False, scorer=count_scores)
    scored = [(fs.long_factor, fs.start_tokens) for fs in count_scores]
    assert len(scored) == len(set(scored)) == second.evaluations
    assert len(set(keys(read_log(tmp_path)))) == len(read_log(tmp_path)) == second.evaluations


def test_nan_scores_lose_and_never_crash(lm, tiny_model_dir, tiny_corpus, tmp_path):
    def poison(module, args, output):
        factors = installed_factors(lm.model)
        if factors is not None and factors.long_factor[0] > 1.0:  # e.g. the PI seed
            return output * float("nan")
        return output

    handle = lm.model.model.norm.register_forward_hook(poison)
    try:
        result = run_search(recipe_for(tiny_model_dir, tiny_corpus), tmp_path, lm=lm, progress=False)
    finally:
        handle.remove()
    records = read_log(tmp_path)
    poisoned = [r for r in records if r["factors"][0] > 1.0]
    assert poisoned and all(r["perplexity"] == "inf" for r in poisoned)
    assert math.isfinite(result.best_perplexity) and result.best.long_factor[0] == 1.0
    assert "pi" not in result.seed_perplexity or not math.isfinite(result.seed_perplexity["pi"])


def test_racing_never_changes_the_result(lm, tiny_model_dir, tiny_corpus, tmp_path):
    """Racing is sound (tests/test_racing.py has a scorer where it saves forwards): on the real scorer the raced
    search ends with the unraced one's factors and survivors, and never runs more window forwards."""
    plain = run_search(recipe_for(tiny_model_dir, tiny_corpus, "search.documents=3"), tmp_path / "plain",
                       lm=lm, progress=False)
    raced = run_search(recipe_for(tiny_model_dir, tiny_corpus, "search.documents=3", "search.racing=true"),
                       tmp_path / "raced", lm=lm, progress=False)
    assert raced.best.long_factor == plain.best.long_factor and raced.best_perplexity == plain.best_perplexity
    assert raced.counters["windows"] <= plain.counters["windows"]
    parents = [json.loads((tmp_path / name / "state.json").read_text())["parents"] for name in ("plain", "raced")]
    assert parents[0] == parents[1]


def test_budgets_max_evals_time_and_plateau(lm, tiny_model_dir, tiny_corpus, tmp_path):
    evals = run_search(recipe_for(tiny_model_dir, tiny_corpus, "search.max_evals=11"), tmp_path / "e", lm=lm,
                       progress=False)
    assert evals.evaluations == 11 and evals.stopped == "max_evals"
    timed = run_search(recipe_for(tiny_model_dir, tiny_corpus, "search.max_minutes=0.00001"), tmp_path / "t",
                       lm=lm, progress=False)
    assert timed.stopped == "max_minutes" and timed.evaluations < 8
    flat = run_search(recipe_for(tiny_model_dir, tiny_corpus, "search.patience=1", "search.iterations=50",
                                 "search.factor_step=0.5", "search.start_tokens=0"), tmp_path / "p", lm=lm,
                      progress=False)
    assert flat.stopped == "plateau" and len(flat.history) < 51
    assert flat.history[-1]["best"] == flat.history[-2]["best"]


def test_fixed_and_searched_start_tokens(lm, tiny_model_dir, tiny_corpus, tmp_path):
    fixed = run_search(recipe_for(tiny_model_dir, tiny_corpus, "search.start_tokens=0"), tmp_path / "f", lm=lm,
                       progress=False)
    assert fixed.best.start_tokens == 0 and {r["start_tokens"] for r in read_log(tmp_path / "f")} == {0}
    run_search(recipe_for(tiny_model_dir, tiny_corpus), tmp_path / "s", lm=lm, progress=False)
    assert len({r["start_tokens"] for r in read_log(tmp_path / "s")}) > 1


def test_progressive_search_is_relative_to_the_base_factors(lm, tiny_model_dir, tiny_corpus, tmp_path):
    base = pi_factors(lm.layout, TARGET)  # the "fine-tuned model" runs PI at 4x
    base_path = base.save(tmp_path / "base.json", lm.layout)
    result = run_search(recipe_for(tiny_model_dir, tiny_corpus, f"search.base_factors={base_path}",
                                   target=2 * TARGET), tmp_path / "out", lm=lm, progress=False)
    relative = result.best.provenance["relative_factor"]
    assert all(1.0 <= r <= 1.25 * 2 + 1e-9 for r in relative)  # s' = 512 / 256
    assert result.best.long_factor == pytest.approx([r * b for r, b in zip(relative, base.long_factor, strict=True)])
    # the YaRN seed is YaRN of the fine-tuned model's own RoPE (theta_i / b_i over 256), snapped to the grid
    expected = itertools.accumulate((round(f, 2) for f in yarn_relative_factors(
        lm.layout, base.long_factor, TARGET, 2 * TARGET)), max)
    seed = next(r for r in read_log(tmp_path / "out") if r["origin"] == "yarn")
    assert seed["factors"] == pytest.approx([e * b for e, b in zip(expected, base.long_factor, strict=True)])
    with pytest.raises(RecipeError, match="base target below"):
        run_search(recipe_for(tiny_model_dir, tiny_corpus, f"search.base_factors={base_path}"), tmp_path / "bad",
                   lm=lm, progress=False)


def test_attention_base_keeps_the_fine_tuned_temperature(lm, tiny_model_dir, tiny_corpus, tmp_path):
    from dataclasses import replace

    base = replace(pi_factors(lm.layout, TARGET), attention=1.07)
    base_path = base.save(tmp_path / "base.json", lm.layout)
    result = run_search(recipe_for(tiny_model_dir, tiny_corpus, f"search.base_factors={base_path}",
                                   "search.attention=base", "search.iterations=1", target=2 * TARGET),
                        tmp_path / "out", lm=lm, progress=False)
    assert result.best.attention == 1.07 and installed_factors(lm.model) is None
    su = run_search(recipe_for(tiny_model_dir, tiny_corpus, f"search.base_factors={base_path}",
                               "search.iterations=1", target=2 * TARGET), tmp_path / "su", lm=lm, progress=False)
    assert su.best.attention == pytest.approx(math.sqrt(1 + math.log(8) / math.log(lm.layout.original_length)))
    with pytest.raises(RecipeError, match="search.attention=base"):
        run_search(recipe_for(tiny_model_dir, tiny_corpus, "search.attention=base"), tmp_path / "bad",
                   lm=lm, progress=False)


def test_refuses_to_clobber_or_resume_a_different_search(lm, tiny_model_dir, tiny_corpus, tmp_path):
    run_search(recipe_for(tiny_model_dir, tiny_corpus, "search.iterations=1"), tmp_path, lm=lm, progress=False)
    with pytest.raises(RecipeError, match="--resume"):
        run_search(recipe_for(tiny_model_dir, tiny_corpus), tmp_path, lm=lm, progress=False)
    with pytest.raises(RecipeError, match="population"):
        run_search(recipe_for(tiny_model_dir, tiny_corpus, "search.population=9"), tmp_path, lm=lm, resume=True,
                   progress=False)
    with pytest.raises(RecipeError, match="search.target is not set"):
        run_search(load_recipe(None, []), tmp_path / "x", lm=lm, progress=False)


def test_resume_recovers_scores_logged_after_the_last_checkpoint(lm, tiny_model_dir, tiny_corpus, tmp_path,
                                                                monkeypatch, count_scores):
    """A deterministic crash between logging and checkpointing, plus a torn last log line."""
    reference = run_search(recipe_for(tiny_model_dir, tiny_corpus), tmp_path / "ref", lm=lm, progress=False)
    count_scores.clear()
    real_save, calls = state_module.save_state, []

    def crash_on_third_checkpoint(out_dir, state):
        calls.append(state.generation)
        if len(calls) == 4:  # initial, gen 0, gen 1 written; dies before writing gen 2
            raise KeyboardInterrupt("killed")
        real_save(out_dir, state)

    from longrope_cli.search import engine as engine_module

    monkeypatch.setattr(engine_module, "save_state", crash_on_third_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_search(recipe_for(tiny_model_dir, tiny_corpus), tmp_path / "run", lm=lm, progress=False,
                   scorer=count_scores)
    monkeypatch.setattr(engine_module, "save_state", real_save)
    scored_before = len(count_scores)
    with open(tmp_path / "run" / "candidates.jsonl", "a") as handle:
        handle.write('{"n": 99, "idx": [1, 2')  # torn write
    resumed = run_search(recipe_for(tiny_model_dir, tiny_corpus), tmp_path / "run", lm=lm, resume=True,
                         progress=False, scorer=count_scores)
    assert resumed.best.long_factor == reference.best.long_factor
    assert resumed.best.start_tokens == reference.best.start_tokens
    assert resumed.evaluations == reference.evaluations
    assert len(count_scores) == reference.evaluations  # nothing scored twice, across the crash
    assert scored_before == 8 + 2 * 6  # generation 2's scores came back from the log
    assert [h["best"] for h in resumed.history] == [h["best"] for h in reference.history]
    assert resumed.counters["cache_hits"] == reference.counters["cache_hits"]


def kill_seed() -> int:
    """The seed of the SIGKILL test's random choices: LONGROPE_KILL_SEED if set (to replay a failure), else fresh."""
    return int(os.environ.get("LONGROPE_KILL_SEED") or random.SystemRandom().randrange(2**32))


def test_sigkill_at_a_random_moment_then_resume_gives_the_uninterrupted_factors(lm, tiny_model_dir, tiny_corpus,
                                                                                 tmp_path):
    seed = kill_seed()
    rng = random.Random(seed)  # every random choice below (search seed, kill moment) comes from it
    replay = f"LONGROPE_KILL_SEED={seed}"
    print(f"kill seed: {replay}")  # shown by pytest with a failure's captured output
    overrides = ["search.iterations=4", "search.documents=3", f"search.seed={rng.randrange(1000)}"]
    target = 2 * TARGET  # slower candidates: the kill lands mid-search
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic as the 1-thread subprocess
    try:
        reference = run_search(recipe_for(tiny_model_dir, tiny_corpus, *overrides, target=target),
                               tmp_path / "ref", lm=lm, progress=False)
        total = reference.evaluations
        kill_after = rng.randint(1, total - 2)
        delay = rng.uniform(0.0, 0.03)
        aim = f"{replay}: {overrides[-1]}, kill after {kill_after} of {total} evaluations + {delay * 1000:.1f} ms"
        out = tmp_path / "killed"
        command = [sys.executable, "-m", "longrope_cli", "search", "--model", str(tiny_model_dir), "--device", "cpu",
                   "--target", str(target), "--out", str(out), "--no-progress", f"data.corpus={tiny_corpus}",
                   *SMALL, *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        log_file = out / "candidates.jsonl"
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if log_file.is_file() and log_file.read_bytes().count(b"\n") >= kill_after:
                time.sleep(delay)
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate()
        assert proc.returncode in (-signal.SIGKILL, 0), f"{aim}\n{stderr.decode()[-2000:]}"
        done_before = len(read_log(out)) if log_file.is_file() else 0
        resumed = run_search(recipe_for(tiny_model_dir, tiny_corpus, *overrides, target=target), out, lm=lm,
                             resume=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    message = f"{aim}: killed after {done_before} (exit {proc.returncode}); rerun with {replay} to replay the aim"
    assert resumed.best.long_factor == reference.best.long_factor, message
    assert resumed.best.start_tokens == reference.best.start_tokens, message
    assert resumed.best_perplexity == reference.best_perplexity, message
    assert resumed.evaluations == total, message
    assert len(set(keys(read_log(out)))) == len(read_log(out)) == total, message

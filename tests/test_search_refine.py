"""The search's paper details and LongRoPE2 additions on the tiny random Llama (original window 64): sizes above
512k, the progressive n-hat seed, the critical dimension, validation re-ranking and the temperature search."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace

import pytest

from conftest import small_search
from longrope_cli.models import load_model
from longrope_cli.recipe import load_recipe
from longrope_cli.rope.baselines import pi_factors
from longrope_cli.rope.layout import RopeLayout
from longrope_cli.search.problem import critical_pair, resolve_search, search_problem
from longrope_cli.stages.search import run_search

TARGET = 256
SMALL = small_search(iterations=2, attention_search=False)


def recipe_for(model_dir, corpus, *overrides, target=TARGET):
    return load_recipe(None, [f"model.name={model_dir}", "model.device=cpu", f"data.corpus={corpus}",
                              f"search.target={target}", *SMALL, *overrides])


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def read_log(out):
    return [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]


def test_above_512k_the_paper_halves_the_sizes_unless_the_recipe_sets_them(caplog):
    cfg = load_recipe(None, []).search
    assert (resolve_search(cfg, 256 * 1024).population, resolve_search(cfg, 256 * 1024).documents) == (64, 5)
    with caplog.at_level(logging.INFO):
        big = resolve_search(cfg, 2048 * 1024)
    assert (big.population, big.mutations, big.crossovers, big.documents) == (32, 8, 8, 3)
    assert "above 512k" in caplog.text
    mine = resolve_search(load_recipe(None, ["search.population=48", "search.documents=4"]).search, 2048 * 1024)
    assert (mine.population, mine.documents, mine.mutations) == (48, 4, 8)


def test_progressive_seeds_keep_the_fine_tuned_n_hat(lm, tiny_model_dir, tiny_corpus, tmp_path):
    base = replace(pi_factors(lm.layout, TARGET), start_tokens=4)
    base_path = base.save(tmp_path / "base.json", lm.layout)
    recipe = recipe_for(tiny_model_dir, tiny_corpus, f"search.base_factors={base_path}", target=2 * TARGET)
    problem = search_problem(recipe, lm.layout, 2 * TARGET, "w")
    assert {c.start for c, _ in problem.seeds} == {4}
    fixed = recipe_for(tiny_model_dir, tiny_corpus, f"search.base_factors={base_path}", "search.start_tokens=0",
                       target=2 * TARGET)
    assert {c.start for c, _ in search_problem(fixed, lm.layout, 2 * TARGET, "w").seeds} == {0}


def test_critical_pair_is_the_first_never_trained_through_a_turn():
    layout = RopeLayout(rotary_dim=64, rope_theta=10000.0, original_length=256, head_dim=64)
    cd = critical_pair(layout)
    periods = [2 * math.pi / t for t in layout.inv_freq().tolist()]
    assert cd == 13 and periods[cd - 1] <= 256 < periods[cd]
    llama2 = RopeLayout(rotary_dim=128, rope_theta=10000.0, original_length=4096, head_dim=128)
    assert critical_pair(llama2) == 46  # LongRoPE2 writes ceil(45.03) - 1 = 45: the last pair that completes a turn


def test_critical_dimension_shapes_every_candidate(lm, tiny_model_dir, tiny_corpus, tmp_path):
    result = run_search(recipe_for(tiny_model_dir, tiny_corpus, "search.critical_dim=auto", "search.start_tokens=0"),
                        tmp_path, lm=lm, progress=False)
    cd = critical_pair(lm.layout)
    s = TARGET / lm.layout.original_length
    assert 0 < cd < lm.layout.pairs
    for record in read_log(tmp_path):
        lam = record["factors"]
        assert len(lam) == lm.layout.pairs and all(s - 1e-9 <= v <= 1.25 * s + 1e-9 for v in lam[cd:])
        assert lam[:cd] == pytest.approx([lam[cd] ** (i / cd) for i in range(cd)])
        assert all(a <= b + 1e-12 for a, b in zip(lam, lam[1:], strict=False))
    assert len(result.best.long_factor) == lm.layout.pairs


def test_critical_dim_search_moves_the_boundary_to_the_best_seed_and_resumes(lm, tiny_model_dir, tiny_corpus,
                                                                            tmp_path):
    result = run_search(recipe_for(tiny_model_dir, tiny_corpus, "search.critical_dim=search", "search.start_tokens=0",
                                   "search.iterations=1"), tmp_path, lm=lm, progress=False)
    record = result.best.provenance["critical_dim_search"]
    rows = {row["critical_dim"]: row["perplexity"] for row in record["boundaries"]}
    auto = critical_pair(lm.layout)
    assert set(rows) == {*range(max(1, auto - 4), min(lm.layout.pairs - 1, auto + 4) + 1), "off"}
    assert rows[record["chosen"]] == min(rows.values())
    # the evolution ran in the chosen boundary's space
    chosen = record["chosen"]
    lam = result.best.long_factor
    if chosen != "off":
        assert lam[:chosen] == pytest.approx([lam[chosen] ** (i / chosen) for i in range(chosen)])
    book_path = tmp_path / "critical.json"
    book = json.loads(book_path.read_text())
    # PI, NTK and YaRN under every boundary (under a boundary they often snap to one set: scored once)
    assert len(rows) <= len(book["scores"]) <= 3 * len(rows)
    assert {row["critical_dim"] for row in record["boundaries"]} == {k.split()[1] if k.split()[1] == "off" else
                                                                    int(k.split()[1]) for k in book["scores"]}
    written = book_path.stat().st_mtime_ns
    # a resumed run takes the stored scores and the same boundary, without scoring them again
    again = run_search(recipe_for(tiny_model_dir, tiny_corpus, "search.critical_dim=search", "search.start_tokens=0",
                                  "search.iterations=1"), tmp_path, lm=lm, progress=False, resume=True)
    assert again.best.provenance["critical_dim_search"] == record
    assert book_path.stat().st_mtime_ns == written


def test_critical_dim_search_prefers_a_boundary_when_it_scores_better():
    from longrope_cli.search.evaluator import Evaluator, Fitness
    from longrope_cli.search.problem import choose_critical_dim
    from longrope_cli.search.refine import ScoreBook

    layout = RopeLayout(rotary_dim=64, rope_theta=10000.0, original_length=256, head_dim=64)

    class PrefersNtkShapeBelow(Evaluator):
        """Best when lambda_10 = 8^(10/15): PI's seed under the boundary 15 (auto + 2) and nothing else."""

        def evaluate(self, factor_sets, stop_above=None):
            return [Fitness(10 + abs(f.long_factor[10] - 8 ** (10 / 15))) for f in factor_sets]

    recipe = load_recipe(None, ["search.target=2k", "search.critical_dim=search", "search.start_tokens=0"])
    chosen, rows = choose_critical_dim(recipe, layout, 2048, "w", PrefersNtkShapeBelow(), ScoreBook(None, {}))
    assert critical_pair(layout) == 13 and chosen == 15
    assert min(rows, key=lambda r: r["perplexity"]) == {"critical_dim": 15, "perplexity": 10.0, "seed": "pi"}


def test_validation_re_ranks_the_top_on_fresh_windows(lm, tiny_model_dir, tiny_corpus, tmp_path):
    result = run_search(recipe_for(tiny_model_dir, tiny_corpus, "search.validate_top=3",
                                   "search.validate_documents=2"), tmp_path, lm=lm, progress=False)
    validation = result.best.provenance["validation"]
    fresh = [row["fresh_perplexity"] for row in validation["candidates"]]
    assert validation["windows"] == 2 and len(fresh) == 3
    assert fresh[validation["chosen_rank"]] == min(fresh) == result.best_perplexity
    state = json.loads((tmp_path / "state.json").read_text())
    chosen = state["parents"][validation["chosen_rank"]]
    assert result.best.start_tokens == chosen[1]
    # a rerun (e.g. after a kill during re-ranking) reuses the stored scores
    refine = json.loads((tmp_path / "refine.json").read_text())
    assert len(refine["scores"]) == 3


def test_attention_search_picks_the_best_temperature_it_scored(lm, tiny_model_dir, tiny_corpus, tmp_path):
    result = run_search(recipe_for(tiny_model_dir, tiny_corpus, "search.attention_search=true",
                                   "search.attention_search_evals=6", "search.iterations=1"),
                        tmp_path, lm=lm, progress=False)
    record = result.best.provenance["attention_search"]
    trace = {row["attention"]: row["perplexity"] for row in record["trace"]}
    assert 2 <= len(trace) <= 6
    su = math.sqrt(1 + math.log(4) / math.log(lm.layout.original_length))
    assert all(1.0 <= a <= 2 * su - 1 + 1e-9 for a in trace)
    assert result.best.attention == pytest.approx(min(trace, key=trace.get))
    assert record["perplexity"] == min(trace.values())


def test_the_attention_search_is_on_by_default_and_base_keeps_the_fine_tuned_temperature(
        lm, tiny_model_dir, tiny_corpus, tmp_path):
    on = run_search(recipe_for(tiny_model_dir, tiny_corpus, "search.attention_search=true", "search.iterations=0"),
                    tmp_path / "on", lm=lm, progress=False)
    assert load_recipe(None, []).search.attention_search is True and "attention_search" in on.best.provenance
    base = replace(pi_factors(lm.layout, TARGET), attention=1.07)
    base_path = base.save(tmp_path / "base.json", lm.layout)
    kept = run_search(recipe_for(tiny_model_dir, tiny_corpus, f"search.base_factors={base_path}", "search.attention=base",
                                 "search.attention_search=true", "search.iterations=0", target=2 * TARGET),
                      tmp_path / "base", lm=lm, progress=False)
    assert kept.best.attention == 1.07 and "attention_search" not in kept.best.provenance

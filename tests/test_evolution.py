"""The pure evolution: grid, monotone constraint, n-hat choices, dedup, determinism, seeding, selection."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from longrope_cli.recipe import PAPER_START_TOKENS
from longrope_cli.rope.baselines import baseline_factors
from longrope_cli.rope.layout import RopeLayout
from longrope_cli.search.evolution import (
    Candidate,
    SearchSpace,
    crossover,
    initial_population,
    mutate,
    new_rng,
    propose,
    rng_from_state,
    rng_state,
    select,
)

LAYOUT = RopeLayout(rotary_dim=64, rope_theta=10000.0, original_length=256, head_dim=64, name="t")
TARGET = 2048  # s = 8


def paper_space(start_choices=tuple(PAPER_START_TOKENS)) -> SearchSpace:
    return SearchSpace(pairs=32, factor_min=1.0, factor_max=1.25 * 8, step=0.01, start_choices=start_choices)


def monotone(c: Candidate) -> bool:
    return all(a <= b for a, b in zip(c.idx, c.idx[1:], strict=False))


def test_grid_is_the_papers():
    space = paper_space()
    assert space.top == 900 and space.levels == 901
    assert space.value(0) == 1.0 and space.value(23) == 1.23 and space.value(900) == 10.0
    assert space.start_choices == (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)
    # a ceiling that is not a whole number of steps is never exceeded
    odd = SearchSpace(pairs=4, factor_min=1.0, factor_max=1.255, step=0.01)
    assert odd.value(odd.top) == 1.25


def test_snap_rounds_clips_and_repairs_monotonicity():
    space = SearchSpace(pairs=5, factor_min=1.0, factor_max=2.0, step=0.1, start_choices=(0, 4, 16))
    c = space.snap([0.5, 1.26, 1.1, 3.0, 1.94], start=7)
    assert space.values(c) == (1.0, 1.3, 1.3, 2.0, 2.0)
    assert c.start == 4  # nearest allowed n-hat
    assert space.is_valid(c)
    assert not space.is_valid(Candidate((0, 3, 2, 4, 5), 0))
    assert not space.is_valid(Candidate((0, 1, 2, 3, 4), 5))


@pytest.mark.parametrize("method", ["pi", "ntk", "yarn"])
def test_seeds_from_baselines_snap_onto_the_grid(method):
    space = paper_space()
    factors = baseline_factors(method, LAYOUT, TARGET)
    c = space.snap(factors.long_factor)
    assert space.is_valid(c) and c.start == 0
    for got, want in zip(space.values(c), factors.long_factor, strict=True):
        assert abs(got - want) <= 0.005 + 1e-9


def test_mutation_keeps_every_constraint_and_moves_flat_regions():
    space = paper_space()
    rng = new_rng(1)
    pi = space.snap([8.0] * 32)
    moved, starts = 0, set()
    for _ in range(300):
        child = mutate(pi, space, rng, 0.3)
        assert space.is_valid(child) and monotone(child)
        moved += child.idx != pi.idx
        starts.add(child.start)
    assert moved > 250  # a flat parent (PI) still mutates: runs of equal values move as blocks
    assert len(starts) > 5 and starts <= set(space.start_choices)


def test_fixed_start_tokens_never_change():
    space = paper_space(start_choices=(0,))
    rng = new_rng(2)
    parents = [space.snap(baseline_factors(m, LAYOUT, TARGET).long_factor) for m in ("pi", "ntk", "yarn")]
    children = propose(parents, space, rng, mutations=40, crossovers=40, prob=0.3, seen=set())
    assert children and all(ch.candidate.start == 0 for ch in children)


def test_crossover_is_monotone_and_mixes_parents():
    space = paper_space()
    rng = new_rng(3)
    a = space.snap(baseline_factors("ntk", LAYOUT, TARGET).long_factor, 0)
    b = space.snap(baseline_factors("yarn", LAYOUT, TARGET).long_factor, 16)
    kids = [crossover(a, b, rng) for _ in range(50)]
    assert all(space.is_valid(k) and monotone(k) for k in kids)
    assert {k.start for k in kids} == {0, 16}
    assert any(k.idx not in (a.idx, b.idx) for k in kids)
    for k in kids:  # every gene is at least the smaller parent gene (repair only raises)
        assert all(g >= min(x, y) for g, x, y in zip(k.idx, a.idx, b.idx, strict=True))


def test_children_are_new_and_distinct():
    space = paper_space()
    rng = new_rng(4)
    seeds = [(space.snap(baseline_factors(m, LAYOUT, TARGET).long_factor), m) for m in ("pi", "ntk", "yarn")]
    population = initial_population(seeds, 64, space, rng, 0.3)
    assert len(population) == 64
    assert [p.origin for p in population[:3]] == ["pi", "ntk", "yarn"]
    keys = [p.candidate for p in population]
    assert len(set(keys)) == 64
    parents = keys[:32]
    seen = set(keys)
    children = propose(parents, space, rng, mutations=16, crossovers=16, prob=0.3, seen=seen)
    assert len(children) == 32
    child_keys = [c.candidate for c in children]
    assert len(set(child_keys)) == 32 and not set(child_keys) & seen
    # candidates are hashable values: equal content, equal key (O(1) cache lookups)
    assert Candidate.from_json(json.loads(json.dumps(child_keys[0].to_json()))) in set(child_keys)


def test_duplicate_seeds_are_dropped():
    space = SearchSpace(pairs=4, factor_min=1.0, factor_max=2.0, step=0.5)
    c = space.snap([1.0, 1.0, 2.0, 2.0])
    population = initial_population([(c, "a"), (c, "b")], 3, space, new_rng(0), 0.5)
    assert [p.origin for p in population][:1] == ["a"]
    assert len({p.candidate for p in population}) == len(population) == 3


def test_tiny_space_exhausts_without_looping_forever():
    space = SearchSpace(pairs=2, factor_min=1.0, factor_max=1.0, step=0.1)  # one point
    c = space.snap([1.0, 1.0])
    assert len(initial_population([(c, "only")], 10, space, new_rng(0), 0.5)) == 1
    assert propose([c], space, new_rng(0), mutations=4, crossovers=4, prob=0.5, seen={c}) == []


def run_generations(rng, n=3):
    space = paper_space()
    seeds = [(space.snap(baseline_factors(m, LAYOUT, TARGET).long_factor), m) for m in ("pi", "ntk", "yarn")]
    population = [p.candidate for p in initial_population(seeds, 16, space, rng, 0.3)]
    out = [population]
    for _ in range(n):
        kids = propose(population[:8], space, rng, mutations=4, crossovers=4, prob=0.3, seen=set(population))
        population = population[:8] + [k.candidate for k in kids]
        out.append(population)
    return out


def test_deterministic_for_a_seed_and_across_a_saved_rng_state():
    assert run_generations(new_rng(7)) == run_generations(new_rng(7))
    assert run_generations(new_rng(7)) != run_generations(new_rng(8))
    rng = new_rng(7)
    rng.random(5)
    saved = json.loads(json.dumps(rng_state(rng)))  # what state.json stores
    assert run_generations(rng_from_state(saved)) == run_generations(rng)


def test_selection_nan_and_raced_lose_ties_are_stable():
    a, b, c, d, e = (Candidate((i,), 0) for i in range(5))
    scored = [(a, math.nan, True), (b, 3.0, True), (c, 2.0, False), (d, 3.0, True), (e, math.inf, True)]
    best = select(scored, 3)
    assert [s[0] for s in best] == [b, d, a]  # NaN counts as inf (ties keep input order)
    assert [s[0] for s in select(scored, 5)] == [b, d, a, e, c]  # raced (c) after every complete score
    assert [s[0] for s in select([(a, 1.0, True), (a, 1.0, True), (b, 2.0, True)], 2)] == [a, b]


def test_rng_is_numpy_pcg64():
    assert isinstance(new_rng(0).bit_generator, np.random.PCG64)


DRIFT_LAYOUT = RopeLayout(rotary_dim=64, rope_theta=10000.0, original_length=4096, head_dim=64, name="t")


def _mean(space: SearchSpace, c: Candidate) -> float:
    return float(np.mean(space.values(c)))


@pytest.mark.parametrize("method", ["pi", "ntk", "yarn"])
def test_mutation_does_not_drift_lambda(method):
    """From each seed at s = 32 the mean lambda of a mutant is the parent's, to sampling error (the shift-and-
    push operator drifted PI by +0.8 and YaRN by +0.5 per mutation)."""
    s = 32
    space = SearchSpace(pairs=32, factor_min=1.0, factor_max=1.25 * s, step=0.01)
    seed = space.snap(baseline_factors(method, DRIFT_LAYOUT, 4096 * s).long_factor)
    rng = new_rng(0)
    drift = [_mean(space, mutate(seed, space, rng, 0.3)) - _mean(space, seed) for _ in range(2000)]
    assert abs(float(np.mean(drift))) < 0.15


@pytest.mark.parametrize("method", ["pi", "ntk", "yarn"])
def test_crossover_does_not_drift_lambda(method):
    """Crossing two mutants of one seed gives, on average, their midpoint (a running maximum drifted it up by
    +1.1 from PI at s = 32)."""
    s = 32
    space = SearchSpace(pairs=32, factor_min=1.0, factor_max=1.25 * s, step=0.01)
    seed = space.snap(baseline_factors(method, DRIFT_LAYOUT, 4096 * s).long_factor)
    rng = new_rng(0)
    drift = []
    for _ in range(1000):
        a, b = mutate(seed, space, rng, 0.3), mutate(seed, space, rng, 0.3)
        child = crossover(a, b, rng)
        assert monotone(child)
        drift.append(_mean(space, child) - (_mean(space, a) + _mean(space, b)) / 2)
    assert abs(float(np.mean(drift))) < 0.1

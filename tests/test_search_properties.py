"""Property tests (hypothesis) of the search space and the evolution operators.

tests/test_evolution.py checks the paper's space with hand-picked seeds; here the space itself is drawn (number of
pairs, grid step, factor_min / factor_max, n-hat choices) and so are the parents and the RNG seed. Validity is
checked from first principles (`check_valid`), not only through `SearchSpace.is_valid`, so that a bug in
`is_valid` cannot hide a bad child. A failure prints the falsifying example (hypothesis also keeps it in .hypothesis/ and replays it first).
"""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longrope_cli.search.evolution import (
    Candidate,
    SearchSpace,
    crossover,
    initial_population,
    mutate,
    new_rng,
    propose,
)

# Small enough that the whole file runs in a few seconds on a shared 2-core machine; HYPOTHESIS_PROFILE=thorough
# draws 30x more examples (a minute or two) when hunting for a bug.
settings.register_profile("fast", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", parent=settings.get_profile("fast"), max_examples=2000)
FAST = settings(settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast")))
EPS = 1e-9

steps = st.sampled_from([0.001, 0.01, 0.05, 0.1, 0.125, 0.25, 0.3, 0.5, 1.0, 2.5]) | st.floats(0.005, 3.0)
start_choices = st.sets(st.integers(0, 512), min_size=1, max_size=14) | st.just({0}) | st.just(
    {0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256})


@st.composite
def spaces(draw, max_pairs: int = 40, max_levels: int = 400) -> SearchSpace:
    step = draw(steps)
    factor_min = draw(st.floats(0.25, 4.0, allow_nan=False))
    # the ceiling: exactly on the grid, between two grid points, or equal to the floor (one level)
    whole = draw(st.integers(0, max_levels - 1))
    frac = draw(st.sampled_from([0.0, 0.0, 0.3, 0.5, 0.999]))
    factor_max = factor_min + (whole + frac) * step
    return SearchSpace(pairs=draw(st.integers(1, max_pairs)), factor_min=factor_min, factor_max=factor_max,
                       step=step, start_choices=tuple(draw(start_choices)))


@st.composite
def candidates(draw, space: SearchSpace) -> Candidate:
    idx = sorted(draw(st.lists(st.integers(0, space.top), min_size=space.pairs, max_size=space.pairs)))
    return Candidate(tuple(idx), draw(st.sampled_from(space.start_choices)))


@st.composite
def space_and_parents(draw, n: int = 2, **kwargs):
    space = draw(spaces(**kwargs))
    return space, [draw(candidates(space)) for _ in range(n)]


seeds = st.integers(0, 2**32 - 1)
probs = st.sampled_from([0.0, 0.05, 0.3, 0.5, 1.0]) | st.floats(0.0, 1.0)


def check_valid(space: SearchSpace, c: Candidate) -> None:
    """Every constraint of the search space, checked directly on the lambda values."""
    assert isinstance(c, Candidate) and len(c.idx) == space.pairs
    assert all(isinstance(k, int) and 0 <= k <= space.top for k in c.idx), c
    values = space.values(c)
    assert all(a <= b for a, b in zip(values, values[1:], strict=False)), f"lambda decreases: {values}"
    assert all(space.factor_min - EPS <= v <= space.factor_max + EPS for v in values), (
        f"outside [{space.factor_min}, {space.factor_max}]: {values}")
    for v in values:  # on the grid factor_min + k * step
        k = (v - space.factor_min) / space.step
        assert abs(k - round(k)) < 1e-6, f"{v} is off the grid {space.factor_min} + k * {space.step}"
    assert c.start in space.start_choices, f"n-hat {c.start} not in {space.start_choices}"
    assert space.is_valid(c)  # and the space agrees


# --------------------------------------------------------------------------- the space


@FAST
@given(spaces())
def test_grid_top_is_the_last_level_under_the_ceiling(space):
    assert space.levels == space.top + 1 >= 1
    assert space.value(0) == pytest.approx(space.factor_min)
    assert space.value(space.top) <= space.factor_max + EPS
    assert space.factor_min + (space.top + 1) * space.step > space.factor_max + EPS  # one more step would exceed
    assert list(space.start_choices) == sorted(set(space.start_choices))


@FAST
@given(st.integers(-3, 0), st.floats(-1.0, 0.0), st.floats(0.01, 1.0))
def test_a_bad_space_is_refused(pairs, step, gap):
    with pytest.raises(ValueError):
        SearchSpace(pairs=pairs, factor_min=1.0, factor_max=2.0, step=0.1)
    with pytest.raises(ValueError):
        SearchSpace(pairs=4, factor_min=1.0, factor_max=2.0, step=step)
    with pytest.raises(ValueError):
        SearchSpace(pairs=4, factor_min=1.0 + gap, factor_max=1.0, step=0.1)
    with pytest.raises(ValueError):
        SearchSpace(pairs=4, factor_min=1.0, factor_max=2.0, step=0.1, start_choices=())


@FAST
@given(st.data())
def test_snap_is_valid_idempotent_and_nearest(data):
    space = data.draw(spaces())
    lo, hi = space.factor_min - 2 * space.step - 1.0, space.factor_max + 2 * space.step + 1.0
    raw = data.draw(st.lists(st.floats(lo, hi, allow_nan=False), min_size=space.pairs, max_size=space.pairs))
    start = data.draw(st.integers(-10, 600))
    c = space.snap(raw, start)
    check_valid(space, c)
    assert space.snap(space.values(c), c.start) == c  # idempotent
    assert space.snap(space.values(c), start) == c
    # n-hat: the nearest allowed value (ties to the smaller)
    assert abs(c.start - start) == min(abs(x - start) for x in space.start_choices)
    assert not any(abs(x - start) == abs(c.start - start) and x < c.start for x in space.start_choices)
    # a factor inside the bounds that the running maximum leaves alone moves by at most half a step
    values = space.values(c)
    for i, (r, v) in enumerate(zip(raw, values, strict=True)):
        clipped = min(max(r, space.factor_min), space.value(space.top))
        if i == 0 or values[i - 1] < v:
            assert abs(v - clipped) <= space.step / 2 + 1e-6, (i, r, v)


@FAST
@given(st.data())
def test_a_valid_candidate_snaps_to_itself(data):
    space = data.draw(spaces())
    c = data.draw(candidates(space))
    check_valid(space, c)
    assert space.snap(space.values(c), c.start) == c


@FAST
@given(st.data())
def test_is_valid_refuses_what_breaks_a_constraint(data):
    space = data.draw(spaces())
    c = data.draw(candidates(space))
    idx = list(c.idx)
    i = data.draw(st.integers(0, space.pairs - 1))
    assert not space.is_valid(Candidate(tuple(idx[:i] + [space.top + 1] + idx[i + 1:]), c.start))
    assert not space.is_valid(Candidate(tuple(idx[:i] + [-1] + idx[i + 1:]), c.start))
    assert not space.is_valid(Candidate(tuple(idx + [space.top]), c.start))
    outside = data.draw(st.integers(-5, 700).filter(lambda s: s not in space.start_choices))
    assert not space.is_valid(Candidate(c.idx, outside))
    if space.pairs > 1 and idx[0] < idx[-1]:
        assert not space.is_valid(Candidate(tuple(reversed(idx)), c.start))


# --------------------------------------------------------------------------- operators


@FAST
@given(space_and_parents(n=1), seeds, probs)
def test_mutation_children_are_valid(drawn, seed, prob):
    space, (parent,) = drawn
    rng = new_rng(seed)
    for _ in range(5):
        child = mutate(parent, space, rng, prob)
        check_valid(space, child)
        if not space.searches_start:
            assert child.start == parent.start
        parent = child  # a chain of mutants stays valid too


@FAST
@given(space_and_parents(n=1), seeds)
def test_mutation_with_probability_zero_is_a_copy_and_one_always_moves_something(drawn, seed):
    space, (parent,) = drawn
    assert mutate(parent, space, new_rng(seed), 0.0) == parent
    child = mutate(parent, space, new_rng(seed), 1.0)
    check_valid(space, child)
    if space.searches_start:
        assert child.start != parent.start  # p = 1: n-hat always moves to another allowed value


@FAST
@given(space_and_parents(n=1), seeds, probs)
def test_mutation_is_a_function_of_the_rng(drawn, seed, prob):
    space, (parent,) = drawn
    first = [mutate(parent, space, rng, prob) for rng in [new_rng(seed)] for _ in range(3)]
    again = [mutate(parent, space, rng, prob) for rng in [new_rng(seed)] for _ in range(3)]
    assert first == again


@FAST
@given(space_and_parents(n=2), seeds)
def test_crossover_children_are_valid_and_take_each_gene_from_a_parent(drawn, seed):
    space, (a, b) = drawn
    rng = new_rng(seed)
    for _ in range(5):
        child = crossover(a, b, rng)
        check_valid(space, child)
        assert all(g in (x, y) for g, x, y in zip(child.idx, a.idx, b.idx, strict=True)), (a, b, child)
        assert child.start in (a.start, b.start)


@FAST
@given(space_and_parents(n=5, max_pairs=12, max_levels=40), seeds, probs,
       st.integers(0, 6), st.integers(0, 6))
def test_proposed_children_are_valid_new_and_distinct(drawn, seed, prob, mutations, crossovers):
    space, parents = drawn
    parents = list(dict.fromkeys(parents))
    seen = set(parents[1:2])
    children = propose(parents, space, new_rng(seed), mutations=mutations, crossovers=crossovers, prob=prob,
                       seen=seen)
    assert len(children) <= mutations + (crossovers if len(parents) >= 2 else 0)
    for child in children:
        check_valid(space, child.candidate)
    keys = [c.candidate for c in children]
    assert len(set(keys)) == len(keys) and not set(keys) & (seen | set(parents))


@FAST
@given(space_and_parents(n=3, max_pairs=12, max_levels=40), seeds, probs, st.integers(1, 20))
def test_initial_population_keeps_the_seeds_then_adds_valid_distinct_mutants(drawn, seed, prob, size):
    space, seeds_ = drawn
    named = [(c, f"seed{i}") for i, c in enumerate(seeds_)]
    population = initial_population(named, size, space, new_rng(seed), prob)
    unique_seeds = list(dict.fromkeys(seeds_))
    assert 1 <= len(population) <= size
    assert [p.candidate for p in population[:len(unique_seeds)]] == unique_seeds[:size]
    for p in population:
        check_valid(space, p.candidate)
    assert len({p.candidate for p in population}) == len(population)
    # a space with room for `size` distinct points and prob > 0 fills the population
    room = math.comb(space.top + space.pairs, space.pairs) * len(space.start_choices)
    if prob >= 0.3 and room >= 50 * size:
        assert len(population) == size


@FAST
@given(spaces(max_pairs=8))
def test_an_invalid_seed_is_refused(space):
    bad = Candidate(tuple([space.top + 1] * space.pairs), space.start_choices[0])
    with pytest.raises(ValueError, match="not a valid candidate"):
        initial_population([(bad, "bad")], 4, space, new_rng(0), 0.3)

"""The evolutionary search itself, with no torch: a grid, candidates, mutation, crossover, selection.

A candidate is `(idx, start)`: `idx[i]` is the grid index of lambda_i (lambda = factor_min + idx * step,
non-decreasing in i) and `start` is n-hat. Integers make a candidate exactly hashable, so "was this
scored already?" is one dict lookup (the public code scans its whole history with `np.allclose`).

Every random choice comes from one `numpy.random.Generator` owned by the caller, whose state is
saved with each checkpoint: a resumed search draws exactly the numbers an uninterrupted one draws.

Operators (unbiased: neither pushes lambda one way; the tests measure the mean drift from each seed):
- mutation: each lambda_i fires with probability p and moves a block by +-delta grid steps (sign fair,
  delta from a half-normal): the block is lambda_i with the rest of its run of equal values on one side
  (to the right when moving up, to the left when moving down), so flat stretches (PI: all equal) can move.
  A move that would break monotonicity or the bounds is rejected and redrawn, never repaired: repairs
  that push the neighbours along drift lambda upward (about +2 per mutation from PI at s = 32). n-hat
  moves to another allowed value with probability p.
- crossover: each lambda_i from either parent; a non-monotone child is rejected and redrawn (as the
  official code does); after a few misses, a one-point crossover at a cut where the parents join
  monotonically. n-hat from either parent. (A running-maximum repair drifts lambda upward.)
- children are redrawn (up to `tries` times) until they are new: never a copy of a parent nor a
  candidate scored before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

TRIES = 64  # redraws before accepting that a child cannot be new (tiny spaces)


class Candidate(NamedTuple):
    """One point of the search space: grid indices of lambda_i (high to low frequency) and n-hat."""

    idx: tuple[int, ...]
    start: int = 0

    def to_json(self) -> list:
        return [list(self.idx), self.start]

    @classmethod
    def from_json(cls, data: Sequence) -> Candidate:
        return cls(tuple(int(i) for i in data[0]), int(data[1]))


@dataclass(frozen=True)
class SearchSpace:
    """lambda_i on the grid factor_min + k * step (k = 0..levels-1, never above factor_max), non-decreasing in i;
    n-hat from `start_choices` (one choice = n-hat fixed)."""

    pairs: int
    factor_min: float
    factor_max: float
    step: float
    start_choices: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if self.pairs < 1:
            raise ValueError("a search space needs at least one frequency pair")
        if self.step <= 0 or self.factor_max < self.factor_min:
            raise ValueError(f"bad grid [{self.factor_min}, {self.factor_max}] step {self.step}")
        if not self.start_choices:
            raise ValueError("start_choices is empty")
        object.__setattr__(self, "start_choices", tuple(sorted(set(int(c) for c in self.start_choices))))

    @property
    def top(self) -> int:
        """The largest grid index."""
        return int(math.floor((self.factor_max - self.factor_min) / self.step + 1e-9))

    @property
    def levels(self) -> int:
        return self.top + 1

    @property
    def searches_start(self) -> bool:
        return len(self.start_choices) > 1

    def value(self, index: int) -> float:
        # Rounded so that 1.0 + 23 * 0.01 is written as 1.23, not 1.2300000000000002.
        return round(self.factor_min + index * self.step, 10)

    def values(self, candidate: Candidate) -> tuple[float, ...]:
        return tuple(self.value(k) for k in candidate.idx)

    def snap(self, factors: Iterable[float], start: int = 0) -> Candidate:
        """The nearest valid candidate: each factor rounded to the grid and clipped to its bounds, then made
        non-decreasing (running maximum); n-hat to the nearest allowed value."""
        raw = np.asarray(list(factors), dtype=np.float64)
        if raw.shape != (self.pairs,):
            raise ValueError(f"expected {self.pairs} factors, got {raw.size}")
        k = np.clip(np.rint((raw - self.factor_min) / self.step), 0, self.top).astype(np.int64)
        k = np.maximum.accumulate(k)
        return Candidate(tuple(int(x) for x in k), self.snap_start(start))

    def snap_start(self, start: int) -> int:
        return min(self.start_choices, key=lambda c: (abs(c - start), c))

    def is_valid(self, candidate: Candidate) -> bool:
        idx = candidate.idx
        return (
            len(idx) == self.pairs
            and all(0 <= k <= self.top for k in idx)
            and all(a <= b for a, b in zip(idx, idx[1:], strict=False))
            and candidate.start in self.start_choices
        )

    def describe(self) -> dict:
        return {"pairs": self.pairs, "factor_min": self.factor_min, "factor_max": self.factor_max,
                "step": self.step, "levels": self.levels, "start_choices": list(self.start_choices)}


# --------------------------------------------------------------------------- operators


def _shift_scale(space: SearchSpace) -> float:
    """Typical size, in grid steps, of a shift move: 5% of the grid (at least one step)."""
    return max(1.0, 0.05 * space.top)


MOVE_TRIES = 4  # redraws of one gene's move before leaving that gene as it is


def _block_move(idx: list[int], i: int, space: SearchSpace, rng: np.random.Generator) -> None:
    """Move gene i, with the genes equal to it on the side it moves away from, by a fair +-delta (in place).
    Rejected and redrawn when it would leave the bounds or break monotonicity."""
    n = len(idx)
    for _ in range(MOVE_TRIES):
        delta = max(1, int(round(abs(rng.normal(0.0, _shift_scale(space))))))
        up = rng.random() < 0.5
        lo = hi = i
        if up:
            while hi + 1 < n and idx[hi + 1] == idx[i]:
                hi += 1
            value = idx[i] + delta
            if value > space.top or (hi + 1 < n and idx[hi + 1] < value):
                continue
        else:
            while lo > 0 and idx[lo - 1] == idx[i]:
                lo -= 1
            value = idx[i] - delta
            if value < 0 or (lo > 0 and idx[lo - 1] > value):
                continue
        idx[lo:hi + 1] = [value] * (hi - lo + 1)
        return


def mutate(parent: Candidate, space: SearchSpace, rng: np.random.Generator, prob: float) -> Candidate:
    """One mutated copy of `parent` (may equal it when no gene fires; `propose` redraws those)."""
    idx = list(parent.idx)
    fire = np.flatnonzero(rng.random(len(idx)) < prob)
    # In random order: a fixed left-to-right order lets earlier moves fence later ones in one direction
    # (after a suffix moves up, a later prefix cannot move down past it), which drifts lambda upward.
    for i in rng.permutation(fire):
        _block_move(idx, int(i), space, rng)
    start = parent.start
    if space.searches_start and rng.random() < prob:
        others = [c for c in space.start_choices if c != start]
        start = int(others[int(rng.integers(len(others)))])
    return Candidate(tuple(idx), start)


CROSS_TRIES = 8  # uniform crossings tried before a one-point crossing


def crossover(a: Candidate, b: Candidate, rng: np.random.Generator) -> Candidate:
    """Each gene from either parent, redrawn until monotone; else a one-point crossing at a monotone cut."""
    pa, pb = np.asarray(a.idx), np.asarray(b.idx)
    start = int(b.start if rng.random() < 0.5 else a.start)
    for _ in range(CROSS_TRIES):
        genes = np.where(rng.random(len(pa)) < 0.5, pb, pa)
        if np.all(genes[1:] >= genes[:-1]):
            return Candidate(tuple(int(x) for x in genes), start)
    # a[:c] + b[c:] is monotone iff a[c-1] <= b[c]; either parent may lead. There is always a valid cut
    # (c = 0 or n: a copy of a parent, which `propose` then redraws).
    cuts = [(c, x, y) for x, y in ((pa, pb), (pb, pa)) for c in range(len(pa) + 1)
            if c in (0, len(pa)) or x[c - 1] <= y[c]]
    c, x, y = cuts[int(rng.integers(len(cuts)))]
    genes = np.concatenate([x[:c], y[c:]])
    return Candidate(tuple(int(v) for v in genes), start)


def _new_child(make: Callable[[], Candidate], taken: set[Candidate] | frozenset, tries: int,
               stats: dict[str, int] | None = None) -> Candidate | None:
    for attempt in range(tries):
        child = make()
        if child not in taken:
            return child
        if attempt == 0 and stats is not None:
            # A search without dedup would have scored this draw again: what the cache / redraw saves.
            stats["duplicates"] = stats.get("duplicates", 0) + 1
    return None


@dataclass
class Child:
    """A proposed candidate and how it was made (for the log)."""

    candidate: Candidate
    origin: str


def initial_population(
    seeds: Sequence[tuple[Candidate, str]], size: int, space: SearchSpace, rng: np.random.Generator,
    prob: float, tries: int = TRIES,
) -> list[Child]:
    """The seeds (deduplicated, in order) then mutants of randomly chosen seeds, up to `size` distinct candidates."""
    out: list[Child] = []
    taken: set[Candidate] = set()
    for candidate, origin in seeds:
        if not space.is_valid(candidate):
            raise ValueError(f"seed {origin!r} is not a valid candidate of the search space")
        if candidate not in taken:
            taken.add(candidate)
            out.append(Child(candidate, origin))
    if not out:
        raise ValueError("the search needs at least one seed")
    parents = list(out)
    while len(out) < size:
        parent = parents[int(rng.integers(len(parents)))]
        child = _new_child(lambda p=parent: mutate(p.candidate, space, rng, prob), taken, tries)
        if child is None:
            break  # the space is (nearly) exhausted
        taken.add(child)
        out.append(Child(child, f"mutant of {parent.origin}"))
    return out[:size]


def propose(
    parents: Sequence[Candidate], space: SearchSpace, rng: np.random.Generator, *, mutations: int,
    crossovers: int, prob: float, seen: set[Candidate] | frozenset, tries: int = TRIES,
    stats: dict[str, int] | None = None,
) -> list[Child]:
    """One generation of children: `mutations` mutants of random parents, then `crossovers` crossings of two
    distinct random parents (a crossing that cannot be new falls back to a mutant of its first parent).
    Children are new: not in `seen` (candidates of earlier generations), not parents, not each other.
    `stats["duplicates"]` counts first draws that were not new (a search without dedup would rescore them)."""
    if not parents:
        return []
    taken: set[Candidate] = set(seen) | set(parents)
    children: list[Child] = []
    for _ in range(mutations):
        parent = parents[int(rng.integers(len(parents)))]
        child = _new_child(lambda p=parent: mutate(p, space, rng, prob), taken, tries, stats)
        if child is not None:
            taken.add(child)
            children.append(Child(child, "mutation"))
    for _ in range(crossovers):
        if len(parents) < 2:
            break
        i, j = rng.choice(len(parents), size=2, replace=False)
        a, b = parents[int(min(i, j))], parents[int(max(i, j))]
        child = _new_child(lambda a=a, b=b: crossover(a, b, rng), taken, tries, stats)
        origin = "crossover"
        if child is None:
            child = _new_child(lambda a=a: mutate(a, space, rng, prob), taken, tries)
            origin = "mutation (crossover fallback)"
        if child is not None:
            taken.add(child)
            children.append(Child(child, origin))
    return children


def rank_key(score: float, complete: bool) -> tuple[int, float]:
    """Sort key of a score: complete before raced, then lower perplexity; NaN and inf last (they lose)."""
    value = score if math.isfinite(score) else math.inf
    return (0 if complete else 1, value)


def select(scored: Sequence[tuple[Candidate, float, bool]], survivors: int) -> list[tuple[Candidate, float, bool]]:
    """The `survivors` best (candidate, score, complete) triples; ties keep their input order (deterministic)."""
    order = sorted(range(len(scored)), key=lambda k: (*rank_key(scored[k][1], scored[k][2]), k))
    out, taken = [], set()
    for k in order:
        if scored[k][0] in taken:
            continue
        taken.add(scored[k][0])
        out.append(scored[k])
        if len(out) == survivors:
            break
    return out


# --------------------------------------------------------------------------- RNG state


def new_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def rng_state(rng: np.random.Generator) -> dict:
    """A JSON-ready copy of the generator's state."""
    return rng.bit_generator.state


def rng_from_state(state: dict) -> np.random.Generator:
    bit = np.random.PCG64()
    bit.state = state
    return np.random.Generator(bit)

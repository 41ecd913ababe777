"""The generation loop shared by `longrope search` and `longrope readjust`.

Per generation: propose children (RNG), look each up in the score cache, score the misses in batches
of `evaluator.parallelism` (logging every score at once), keep the `survivors` best of parents and
children, write the best factor file, checkpoint. Budgets and the plateau rule are checked between
generations (max_evals and wall time also between batches).

Why a resumed run ends exactly where an uninterrupted one does: the RNG state is checkpointed with the
generation, so the replayed generation proposes the same children; scores logged after the checkpoint
refill the cache (they are a prefix of the same ordered batches); "is this child new?" looks only at
candidates of completed generations; ties in selection keep a fixed order.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longrope_cli.errors import RecipeError
from longrope_cli.numbers import json_number, perplexity_from_nll
from longrope_cli.rope.factors import FactorSet
from longrope_cli.search.evaluator import Evaluator
from longrope_cli.search.evolution import (
    Candidate,
    Child,
    SearchSpace,
    initial_population,
    new_rng,
    propose,
    rank_key,
    rng_from_state,
    rng_state,
    select,
)
from longrope_cli.search.state import (
    LOG_FILE,
    STATE_FILE,
    CandidateLog,
    Scored,
    SearchState,
    clean_partial_files,
    load_state,
    log_record,
    record_candidate,
    save_state,
)

log = logging.getLogger(__name__)


@dataclass
class EvolutionSettings:
    """Sizes, seed, racing and budgets of one evolutionary search."""

    population: int = 64
    survivors: int = 32
    mutations: int = 16
    crossovers: int = 16
    mutation_prob: float = 0.3
    iterations: int = 40
    seed: int = 0
    racing: bool = False
    race_margin: float = 0.0
    max_evals: int | None = None
    max_minutes: float | None = None
    patience: int | None = None

    def check(self, section: str = "search") -> EvolutionSettings:
        positive = {"population": self.population, "survivors": self.survivors}
        for key, value in positive.items():
            if value < 1:
                raise RecipeError(f"{section}.{key} must be at least 1, got {value}")
        for key in ("mutations", "crossovers", "iterations"):
            if getattr(self, key) < 0:
                raise RecipeError(f"{section}.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 < self.mutation_prob <= 1.0:
            raise RecipeError(f"{section}.mutation_prob must be in (0, 1], got {self.mutation_prob}")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise RecipeError(f"{section}.max_minutes must be a positive number of minutes, got {self.max_minutes}")
        if not math.isfinite(self.race_margin):
            raise RecipeError(f"{section}.race_margin must be a finite number >= 0, got {self.race_margin}")
        if self.max_evals is not None and self.max_evals < 1:
            raise RecipeError(f"{section}.max_evals must be at least 1, got {self.max_evals}")
        if self.race_margin < 0:
            raise RecipeError(f"{section}.race_margin must be >= 0, got {self.race_margin}")
        return self

    def planned_evaluations(self) -> int:
        planned = self.population + self.iterations * (self.mutations + self.crossovers)
        return min(planned, self.max_evals) if self.max_evals else planned


@dataclass
class Problem:
    """What is searched: the space, the seeds, how a candidate becomes a factor set, and the fingerprint
    that makes a checkpoint resumable only by the same search."""

    space: SearchSpace
    seeds: list[tuple[Candidate, str]]
    to_factors: Callable[[Candidate], FactorSet]
    fingerprint: dict[str, Any]
    label: str = "search"


@dataclass
class Outcome:
    best: Candidate
    best_score: Scored
    state: SearchState
    session_evaluations: int
    session_seconds: float
    # Scorers of other window sets by name (e.g. "fresh"), set by the driver for what runs after the evolution.
    pool: Callable[[str], Evaluator] | None = None


OnGeneration = Callable[[Candidate, Scored, SearchState], None]


class Engine:
    """Runs (or resumes) one search in `out_dir`. Rank 0 only: the evaluator does the parallel part."""

    def __init__(self, problem: Problem, settings: EvolutionSettings, evaluator: Evaluator, out_dir: Path, *,
                 resume: bool = False, progress: bool = True, on_generation: OnGeneration | None = None) -> None:
        self.problem = problem
        self.settings = settings
        self.evaluator = evaluator
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.on_generation = on_generation
        self.log = CandidateLog(self.out_dir / LOG_FILE)
        self.progress = _Progress(progress, problem.label, settings.planned_evaluations())
        self._seen: set[Candidate] = set()

    # ------------------------------------------------------------------ state

    def _open(self) -> SearchState:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        clean_partial_files(self.out_dir)
        fingerprint = self.problem.fingerprint
        if not self.resume:
            if (self.out_dir / STATE_FILE).exists():
                raise RecipeError(f"{self.out_dir} already holds a {self.problem.label}; pass --resume to continue "
                                  "it, or another --out")
            self.log.reset()
            state = SearchState(fingerprint=fingerprint)
            save_state(self.out_dir, state)  # from now on the log always has a fingerprint beside it
            return state
        state = load_state(self.out_dir, fingerprint)
        if state is None:
            log.info("no checkpoint in %s: starting a new %s", self.out_dir, self.problem.label)
            self.log.reset()
            state = SearchState(fingerprint=fingerprint)
            save_state(self.out_dir, state)
            return state
        recovered = 0
        for record in self.log.read():
            candidate, scored = record_candidate(record)
            if candidate not in state.cache:
                state.cache[candidate] = scored
                recovered += 1
        log.info("resuming %s in %s after generation %d (%d scores cached, %d recovered from %s)",
                 self.problem.label, self.out_dir, state.generation, len(state.cache), recovered, LOG_FILE)
        return state

    # ------------------------------------------------------------------ loop

    def run(self) -> Outcome:
        state = self._open()
        settings, space = self.settings, self.problem.space
        rng = rng_from_state(state.rng) if state.rng else new_rng(settings.seed)
        self._seen = {c for c, s in state.cache.items() if s.generation <= state.generation}
        self._clock = time.monotonic()
        self._base_elapsed = state.elapsed
        start_evals = state.evaluations
        self.progress.start(state.evaluations)
        try:
            if state.generation < 0:
                children = initial_population(self.problem.seeds, settings.population, space, rng,
                                              settings.mutation_prob)
                self._generation(state, 0, children, [], None, rng)
            while True:
                state.stopped = self._stop_reason(state)
                if state.stopped:
                    break
                stats = {"duplicates": 0}
                children = propose(state.parents, space, rng, mutations=settings.mutations,
                                   crossovers=settings.crossovers, prob=settings.mutation_prob, seen=self._seen,
                                   stats=stats)
                state.counters["duplicates"] = state.counters.get("duplicates", 0) + stats["duplicates"]
                if not children:
                    state.stopped = "exhausted"
                    break
                self._generation(state, state.generation + 1, children, state.parents, self._threshold(state), rng)
        finally:
            self.progress.stop()
        state.elapsed = self._elapsed()
        save_state(self.out_dir, state)
        best = state.parents[0]
        if not math.isfinite(state.cache[best].value):
            raise RecipeError(
                f"{self.problem.label}: every candidate scored inf or NaN ({state.evaluations} evaluations): the "
                "model diverges at this length; check model.dtype (float16 overflows at long lengths: use bfloat16 "
                "or float32) and the model itself")
        log.info("%s stopped (%s) after generation %d: best perplexity %.4f, %d evaluations",
                 self.problem.label, state.stopped, state.generation, state.cache[best].value, state.evaluations)
        return Outcome(best, state.cache[best], state, state.evaluations - start_evals,
                       time.monotonic() - self._clock)

    def _elapsed(self) -> float:
        return self._base_elapsed + time.monotonic() - self._clock

    def _out_of_time(self) -> bool:
        return self.settings.max_minutes is not None and self._elapsed() >= 60.0 * self.settings.max_minutes

    def _stop_reason(self, state: SearchState) -> str | None:
        s = self.settings
        if state.generation >= s.iterations:
            return "iterations"
        if s.max_evals is not None and state.evaluations >= s.max_evals:
            return "max_evals"
        if self._out_of_time():
            return "max_minutes"
        if s.patience is not None and state.stalled >= s.patience:
            return "plateau"
        return None

    def _threshold(self, state: SearchState) -> list[float] | None:
        """Racing, sound: after k of N equal-length windows a child stops only when its NLL so far already
        exceeds the worst survivor's NLL over all N windows (NLL >= 0, so the remaining windows can only add),
        i.e. when its running perplexity exceeds exp(N m / k), m the survivor's mean NLL per window; race_margin
        raises that limit by a fraction (more conservative). Such a child provably ranks below every survivor,
        so racing changes which forwards run, never which candidates survive. Its partial score is cached and
        logged like any other (it is never rescored)."""
        if not self.settings.racing or len(state.parents) < self.settings.survivors:
            return None
        worst = state.cache[state.parents[-1]]
        if not worst.complete or not math.isfinite(worst.value) or not worst.per_window:
            return None
        total = len(worst.per_window) * math.log(worst.value)  # the survivor's summed per-window NLL
        return [perplexity_from_nll(total / k) * (1.0 + self.settings.race_margin)
                for k in range(1, len(worst.per_window) + 1)]

    def _generation(self, state: SearchState, g: int, children: list[Child], parents: list[Candidate],
                    threshold: list[float] | None, rng: Any) -> None:
        """Score the children that need it, keep the best `survivors`, record and checkpoint the generation."""
        to_score, hits = self._pending(state, g, children)
        self._score(state, g, to_score, parents, children, threshold)
        raced_now, scored_now = self._select(state, g, children, parents, hits, threshold)
        state.rng = rng_state(rng)
        state.elapsed = self._elapsed()
        if self.on_generation is not None:
            self.on_generation(state.parents[0], state.cache[state.parents[0]], state)
        save_state(self.out_dir, state)
        self.progress.generation(g, self.settings.iterations, state, self.problem, raced_now, scored_now, hits)

    def _pending(self, state: SearchState, g: int, children: list[Child]) -> tuple[list[Child], int]:
        """The children to score now (not cached, within max_evals) and how many the cache already had."""
        counters, cache = state.counters, state.cache
        counters["requested"] += len(children)
        hits, to_score = 0, []
        for child in children:
            entry = cache.get(child.candidate)
            if entry is None:
                to_score.append(child)
            elif entry.generation < g:
                hits += 1
            else:  # scored in this very generation before a kill: recovered from the log
                self._count(counters, entry)
        counters["cache_hits"] += hits
        if self.settings.max_evals is not None:
            to_score = to_score[:max(0, self.settings.max_evals - state.evaluations)]
        return to_score, hits

    def _score(self, state: SearchState, g: int, to_score: list[Child], parents: list[Candidate],
               children: list[Child], threshold: list[float] | None) -> None:
        """Score in batches of the evaluator's parallelism; each batch is cached and logged as it lands."""
        batch = max(1, int(getattr(self.evaluator, "parallelism", 1)))
        for start in range(0, len(to_score), batch):
            if self._out_of_time() and (parents or start > 0):  # the first generation scores at least one batch
                break
            chunk = to_score[start:start + batch]
            factor_sets = [self.problem.to_factors(c.candidate) for c in chunk]
            fits = self.evaluator.evaluate(factor_sets, stop_above=threshold)
            records = []
            for child, fs, fit in zip(chunk, factor_sets, fits, strict=True):
                scored = Scored(float(fit), getattr(fit, "complete", True), g, child.origin,
                                getattr(fit, "windows", 0), getattr(fit, "seconds", 0.0),
                                tuple(getattr(fit, "per_window", ())))
                if math.isnan(scored.value):
                    scored.value = math.inf  # NaN loses, and never breaks the ordering
                state.cache[child.candidate] = scored
                self._count(state.counters, scored)
                records.append(log_record(child.candidate, scored, fs.long_factor, len(state.cache)))
            self.log.append(records)
            self.progress.advance(len(chunk), self._best_value(state, parents, children))

    def _select(self, state: SearchState, g: int, children: list[Child], parents: list[Candidate], hits: int,
                threshold: list[float] | None) -> tuple[int, int]:
        """Parents and scored children compete for the survivors; returns (raced, scored) in this generation."""
        cache = state.cache
        pool = [(c, cache[c].value, cache[c].complete) for c in parents]
        pool += [(ch.candidate, cache[ch.candidate].value, cache[ch.candidate].complete)
                 for ch in children if ch.candidate in cache]
        if not pool:
            raise RecipeError(f"{self.problem.label}: no candidate could be scored (budget too small?)")
        survivors = select(pool, self.settings.survivors)
        previous_best = cache[parents[0]].value if parents else math.inf
        state.parents = [c for c, _, _ in survivors]
        best = cache[state.parents[0]]
        improved = g == 0 or rank_key(best.value, best.complete) < rank_key(previous_best, True)
        state.stalled = 0 if improved else state.stalled + 1
        self._seen.update(ch.candidate for ch in children)
        now = [cache[ch.candidate] for ch in children if ch.candidate in cache and cache[ch.candidate].generation == g]
        scored_now, raced_now = len(now), sum(1 for entry in now if not entry.complete)
        state.history.append({
            "generation": g, "children": len(children), "scored": scored_now, "cache_hits": hits,
            "raced": raced_now, "best": json_number(best.value), "cutoff": json_number(cache[state.parents[-1]].value),
            "threshold": round(threshold[-1], 6) if threshold else None, "evaluations": state.evaluations,
            "elapsed": round(self._elapsed(), 3),
        })
        state.generation = g
        return raced_now, scored_now

    @staticmethod
    def _count(counters: dict[str, float], scored: Scored) -> None:
        counters["raced"] += 0 if scored.complete else 1
        counters["windows"] += scored.windows
        counters["eval_seconds"] += scored.seconds

    @staticmethod
    def _best_value(state: SearchState, parents: list[Candidate], children: list[Child]) -> float:
        values = [state.cache[c].value for c in parents]
        values += [state.cache[ch.candidate].value for ch in children
                   if ch.candidate in state.cache and state.cache[ch.candidate].complete]
        return min(values, default=math.inf)


# --------------------------------------------------------------------------- progress


HEARTBEAT_SECONDS = 60.0


class _Progress:
    """A rich progress bar (generation, evaluations, best perplexity, ETA) and a table per generation.
    Every generation's summary is logged either way (so OUT/log.txt has it); without the bar a heartbeat line
    every minute shows that a long generation is alive."""

    def __init__(self, enabled: bool, label: str, total: int, heartbeat: float = HEARTBEAT_SECONDS) -> None:
        self.enabled = enabled
        self.label = label
        self.total = total
        self.heartbeat = heartbeat
        self._bar: Any = None
        self._task: Any = None
        self._done = 0
        self._beat = time.monotonic()

    def start(self, done: int) -> None:
        self._done = done
        self._beat = time.monotonic()
        if not self.enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("evals"),
            TextColumn("best {task.fields[best]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            transient=False)
        self._task = self._bar.add_task(f"{self.label} gen 0", total=max(self.total, done), completed=done,
                                        best="-")
        self._bar.start()

    def advance(self, n: int, best: float) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n, best=f"{best:.4f}" if math.isfinite(best) else "-")
        elif time.monotonic() - self._beat >= self.heartbeat:
            self._beat = time.monotonic()
            log.info("%s: %d/%d evaluations, best perplexity so far %s", self.label, self._done, self.total,
                     f"{best:.4f}" if math.isfinite(best) else "-")

    def generation(self, g: int, iterations: int, state: SearchState, problem: Problem, raced: int, scored: int,
                   hits: int) -> None:
        best = state.cache[state.parents[0]]
        summary = (f"{problem.label} generation {g}/{iterations}: {scored} scored, {hits} cached, {raced} raced; "
                   f"best perplexity {best.value:.4f}; {state.evaluations} evaluations, {state.elapsed:.0f} s")
        log.info(summary)
        self._beat = time.monotonic()
        if self._bar is None:
            return
        from rich.table import Table

        table = Table(show_edge=False, box=None, pad_edge=False)
        for column in ("rank", "perplexity", "n-hat", "lambda (first, middle, last)", "origin"):
            table.add_column(column)
        for rank, candidate in enumerate(state.parents[:5], 1):
            entry = state.cache[candidate]
            lam = problem.to_factors(candidate).long_factor
            table.add_row(str(rank), f"{entry.value:.4f}", str(candidate.start),
                          f"{lam[0]:.2f}, {lam[len(lam) // 2]:.2f}, {lam[-1]:.2f}", entry.origin)
        self._bar.console.print(table)
        self._bar.update(self._task, description=f"{self.label} gen {g}/{iterations}")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

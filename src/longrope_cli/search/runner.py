"""`run_search`: from a recipe to `DIR/factors.json`, the best LongRoPE factors at the target length.

Search space (paper): lambda_i on the grid 1.0, 1.01, ... up to 1.25 s (s = target / original), non-
decreasing from high to low frequency; n-hat from {0, 1, 2, 4, ..., 256} or fixed (0 exports to plain
transformers). Seeds: PI, NTK and YaRN at the target (snapped to the grid), plus `search.seed_factors`.
Fitness: perplexity of the first `search.documents` search-split windows of the target length.

Progressive mode (`search.base_factors`, the paper's 2048k search on the 256k fine-tuned model): the
search runs on factors relative to the fine-tuned model's, absolute = relative x base, with the grid and
the seeds built for s' = target / base target. YaRN's ramp there reads the fine-tuned model's own
wavelengths (theta_i / b_i over the fine-tuning window), not the original model's.

Output folder: factors.json (rewritten after every generation), candidates.jsonl, state.json,
complete.json (when finished). With `search.backend=distributed` every rank calls `run_search`: rank 0
runs the evolution and writes the files, the others score candidates, and all return the same result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from longrope_cli.data import load_windows
from longrope_cli.errors import RecipeError
from longrope_cli.lengths import format_length
from longrope_cli.models import LoadedModel, load_model
from longrope_cli.outputs import mark_complete
from longrope_cli.recipe import Recipe, SearchConfig, recipe_to_dict, require_target
from longrope_cli.rope.baselines import baseline_factors, yarn_relative_factors
from longrope_cli.rope.factors import FactorSet, attention_factor, load_factors
from longrope_cli.rope.layout import RopeLayout
from longrope_cli.rope.native import native_base
from longrope_cli.search.engine import Engine, EvolutionSettings, Outcome, Problem
from longrope_cli.search.evaluator import (
    DistributedEvaluator,
    Evaluator,
    LocalEvaluator,
    PoolEvaluator,
    broadcast_from_main,
    distributed_env,
    init_distributed,
    is_main_process,
    local_gpu,
)
from longrope_cli.search.evolution import Candidate, SearchSpace
from longrope_cli.search.needle import needle_windows
from longrope_cli.search.refine import REFINE_FILE, ScoreBook, search_attention, validate_top
from longrope_cli.search.state import Scored, SearchState

log = logging.getLogger(__name__)

FACTORS_FILE = "factors.json"
CRITICAL_FILE = "critical.json"
SEED_METHODS = ("pi", "ntk", "yarn")
LARGE_TARGET = 512 * 1024
PAPER_SIZES = {"population": 64, "mutations": 16, "crossovers": 16, "documents": 5}
LARGE_SIZES = {"population": 32, "mutations": 8, "crossovers": 8, "documents": 3}  # the paper above 512k


def resolve_search(cfg: SearchConfig, target: int) -> SearchConfig:
    """The search section with the paper's sizes filled in where the recipe left them null: 64 / 16 / 16 and
    5 windows, halved (and 3 windows) above 512k, where one forward costs most."""
    sizes = LARGE_SIZES if target > LARGE_TARGET else PAPER_SIZES
    filled = {key: value for key, value in sizes.items() if getattr(cfg, key) is None}
    if target > LARGE_TARGET and filled:
        log.info("search: target %s is above 512k: the paper's halved sizes for %s", format_length(target),
                 ", ".join(f"{k}={v}" for k, v in filled.items()))
    return replace(cfg, **filled)


def validation_windows(cfg: SearchConfig) -> int:
    """Fresh search-split windows for re-ranking (0 when `validate_top` is off)."""
    if not cfg.validate_top:
        return 0
    return cfg.validate_documents if cfg.validate_documents is not None else int(cfg.documents or 0)


def critical_pair(layout: RopeLayout) -> int:
    """The first pair whose period 2 pi / theta_i exceeds the original window: it and every slower pair were
    never trained through a full turn (LongRoPE2's critical dimension; `layout.pairs` when there is none)."""
    periods = [2 * math.pi / theta for theta in layout.inv_freq().tolist()]
    return next((i for i, period in enumerate(periods) if period > layout.original_length), layout.pairs)


CRITICAL_SPAN = 4  # `critical_dim=search` tries the boundaries auto - 4 .. auto + 4, and off
OFF_WORDS = ("off", "none", "false", "")


def _critical_setting(cfg: SearchConfig, layout: RopeLayout, progressive: bool = False) -> int | None:
    text = str(cfg.critical_dim).strip().lower()
    if text in OFF_WORDS:
        return None
    if text == "auto":
        cd = critical_pair(layout)
    elif text == "search":
        cd = min(critical_pair(layout), layout.pairs - 1)  # checked here; `choose_critical_dim` moves it
    else:
        try:
            cd = int(text)
        except ValueError:
            raise RecipeError(f"search.critical_dim={cfg.critical_dim!r}: use off, auto, search or a pair "
                              "index") from None
    if not 0 <= cd < layout.pairs:
        raise RecipeError(f"search.critical_dim={cd} must be a pair index in 0..{layout.pairs - 1} (auto: "
                          f"{critical_pair(layout)} for this model)")
    if progressive:
        raise RecipeError("search.critical_dim applies to a search from plain RoPE; set it to off for a progressive "
                          "search (search.base_factors, or a model whose config already scales RoPE)")
    return cd


def critical_factors(upper: tuple[float, ...], cd: int) -> tuple[float, ...]:
    """Full lambda from the searched pairs cd.. : below cd, lambda_i = lambda_cd ** (i / cd) (NTK-like)."""
    return tuple(round(upper[0] ** (i / cd), 10) for i in range(cd)) + tuple(upper)


@dataclass
class SearchResult:
    """What a search (or readjust) produced: the best factor set, its perplexity, and how it was found."""

    best: FactorSet
    best_perplexity: float
    evaluations: int
    factors_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None
    seconds: float = 0.0
    counters: dict[str, float] = field(default_factory=dict)
    seed_perplexity: dict[str, float] = field(default_factory=dict)


def windows_digest(windows: torch.Tensor | Sequence[torch.Tensor]) -> str:
    """A short hash of the fitness windows: a checkpoint is only valid for the same tokens."""
    digest = hashlib.sha1()
    for w in [windows] if isinstance(windows, torch.Tensor) else windows:
        digest.update(str(tuple(w.shape)).encode())
        digest.update(w.to(torch.int64).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _digest(data: Any) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def settings_from_search(recipe: Recipe) -> EvolutionSettings:
    cfg = recipe.search
    return EvolutionSettings(
        population=cfg.population, survivors=cfg.survivors, mutations=cfg.mutations, crossovers=cfg.crossovers,
        mutation_prob=cfg.mutation_prob, iterations=cfg.iterations, seed=cfg.seed, racing=cfg.racing,
        race_margin=cfg.race_margin, max_evals=cfg.max_evals, max_minutes=cfg.max_minutes, patience=cfg.patience,
    ).check("search")


def search_problem(recipe: Recipe, layout: RopeLayout, target: int, windows_id: str,
                   native: FactorSet | None = None, critical: int | str | None = None) -> Problem:
    """The search space, seeds and candidate -> FactorSet mapping of `longrope search` for one model and target.

    `native`: a pre-scaled model's own RoPE (Llama-3.1, Phi-3-128k, ...; `rope.native.native_base`). Without
    `search.base_factors` the search is then progressive on it, so the model is extended from what it ships.
    `critical`: the boundary `choose_critical_dim` picked (a pair index or "off"), instead of the recipe's."""
    if critical is not None:
        recipe = replace(recipe, search=replace(recipe.search, critical_dim=str(critical)))
    cfg = recipe.search
    scale = layout.scale(target)
    base: FactorSet | None = None
    geometry = layout
    if cfg.base_factors or native is not None:
        base = load_factors(cfg.base_factors, layout) if cfg.base_factors else native
        what = f"search.base_factors {cfg.base_factors!r}" if cfg.base_factors else "the model's own RoPE"
        if not base.target_length or target <= base.target_length:
            raise RecipeError(
                f"{what} was made for "
                f"{format_length(base.target_length) if base.target_length else 'an unknown length'}; a progressive "
                f"search needs a base target below search.target={format_length(target)}")
        geometry = replace(layout, original_length=base.target_length)  # seeds relative to the fine-tuned window
    relative_scale = geometry.scale(target)
    if cfg.start_tokens is not None and cfg.start_tokens < 0:
        raise RecipeError(f"search.start_tokens must be >= 0, got {cfg.start_tokens}")
    choices = (cfg.start_tokens,) if cfg.start_tokens is not None else tuple(cfg.start_token_choices)
    if not choices or min(choices) < 0:
        raise RecipeError("search.start_token_choices must list n-hat values >= 0, e.g. [0, 1, 2, 4, 8]")
    for key in ("factor_step", "factor_min", "factor_max_ratio"):
        value = getattr(cfg, key)
        if not (math.isfinite(value) and value > 0):
            raise RecipeError(f"search.{key} must be a finite positive number, got {value}")
    factor_max = cfg.factor_max_ratio * relative_scale
    if factor_max < cfg.factor_min:
        raise RecipeError(f"search.factor_max_ratio x s = {factor_max:g} is below search.factor_min={cfg.factor_min}")
    cd = _critical_setting(cfg, layout, progressive=base is not None)
    if cd is None:
        space = SearchSpace(layout.pairs, cfg.factor_min, factor_max, cfg.factor_step, choices)
    else:  # only the pairs from cd on are genes, each at least s
        space = SearchSpace(layout.pairs - cd, max(cfg.factor_min, scale), factor_max, cfg.factor_step, choices)
    if cfg.attention == "base":
        # The fine-tuned model learnt this temperature; transformers also applies it to short inputs.
        if base is None:
            raise RecipeError("search.attention=base keeps search.base_factors' attention factor; set "
                              "search.base_factors or use su, yarn, none or a number")
        attention = base.attention
    else:
        attention = attention_factor(cfg.attention, scale, layout.original_length)

    def full(values: tuple[float, ...]) -> tuple[float, ...]:
        return values if cd is None else critical_factors(values, cd)

    def to_factors(candidate: Candidate) -> FactorSet:
        values = full(space.values(candidate))
        if base is not None:
            values = tuple(r * b for r, b in zip(values, base.long_factor, strict=True))
        return FactorSet(long_factor=values, start_tokens=candidate.start, attention=attention,
                         attention_policy=cfg.attention, target_length=target, method="longrope",
                         short_factor=base.short_factor if base is not None else None)  # keep the base's short regime

    def genes(values: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(values) if cd is None else tuple(values)[cd:]

    # The fine-tuned model was trained with its n-hat: the progressive seeds keep it.
    seed_start = base.start_tokens if base is not None else 0
    seeds: list[tuple[Candidate, str]] = []
    for name in SEED_METHODS:
        if base is not None and name == "yarn":
            values = yarn_relative_factors(layout, base.long_factor, base.target_length, target)
        else:
            values = baseline_factors(name, geometry, target).long_factor
        seeds.append((space.snap(genes(values), seed_start), name))
    for path in cfg.seed_factors:
        extra = load_factors(path, layout)
        values = extra.long_factor
        if base is not None:
            values = tuple(v / b for v, b in zip(values, base.long_factor, strict=True))
        seeds.append((space.snap(genes(values), extra.start_tokens), f"file {Path(path).name}"))
    fingerprint = {
        "stage": "search", "model": layout.to_dict(), "target": target, "windows": windows_id,
        "space": space.describe(), "attention": attention, "critical_dim": cd, "fitness": cfg.fitness,
        "base_factors": _digest(list(base.long_factor)) if base else None,
        "seeds": _digest([[*c.to_json(), o] for c, o in seeds]),
        **{k: getattr(cfg, k) for k in ("seed", "population", "survivors", "mutations", "crossovers",
                                        "mutation_prob", "racing", "race_margin")},
    }
    return Problem(space=space, seeds=seeds, to_factors=to_factors, fingerprint=fingerprint, label="search")


def choose_critical_dim(recipe: Recipe, layout: RopeLayout, target: int, windows_id: str, evaluator: Evaluator,
                        book: ScoreBook) -> tuple[int | str, list[dict[str, Any]]]:
    """`search.critical_dim=search`: move LongRoPE2's boundary before the evolution. Each boundary from
    auto - 4 to auto + 4, and off, is scored by its best seed (PI, NTK, YaRN snapped into its space); the
    evolution then runs in the winner's space. Ties go to the boundary nearest auto, then to off."""
    auto = critical_pair(layout)
    options: list[int | str] = [cd for cd in range(auto - CRITICAL_SPAN, auto + CRITICAL_SPAN + 1)
                                if 1 <= cd < layout.pairs]
    options.append("off")
    rows: list[dict[str, Any]] = []
    for option in options:
        problem = search_problem(recipe, layout, target, windows_id, critical=option)
        best = math.inf
        for candidate, origin in problem.seeds[:len(SEED_METHODS)]:
            factors = problem.to_factors(candidate)
            key = f"critical {option} " + json.dumps([list(factors.long_factor), factors.start_tokens])
            value = book.score(key, lambda f=factors: evaluator.evaluate([f])[0])
            if value < best:
                best, best_origin = value, origin
        rows.append({"critical_dim": option, "perplexity": best if math.isfinite(best) else "inf",
                     "seed": best_origin if math.isfinite(best) else None})
        log.info("critical dimension %s: best seed %.4f", option, best)

    def rank(row: dict[str, Any]) -> tuple[float, int]:
        value = row["perplexity"] if row["perplexity"] != "inf" else math.inf
        distance = abs(row["critical_dim"] - auto) if row["critical_dim"] != "off" else layout.pairs
        return value, distance

    chosen = min(rows, key=rank)
    if chosen["perplexity"] == "inf":
        raise RecipeError("search.critical_dim=search: every boundary's seeds scored inf (NaN or overflow); "
                          "check the model and search.target, or set search.critical_dim=off")
    log.info("critical dimension: %s (auto: %d)", chosen["critical_dim"], auto)
    return chosen["critical_dim"], rows


def load_stage_model(recipe: Recipe, distributed: bool) -> LoadedModel:
    """The recipe's model; under torch.distributed with device auto, each rank takes its local GPU."""
    device = recipe.model.device
    if distributed and device == "auto" and torch.cuda.is_available():
        device = f"cuda:{local_gpu(distributed_env()[2])}"
    return load_model(recipe.model.name, dtype=recipe.model.dtype, device=device,
                      attn_implementation=recipe.model.attn_implementation,
                      original_length=recipe.model.original_length,
                      trust_remote_code=recipe.model.trust_remote_code)


def seed_scores(problem: Problem, state: SearchState) -> dict[str, float]:
    """Perplexity of each seed (PI, NTK, YaRN as snapped to the grid) from the score cache."""
    out = {}
    for candidate, origin in problem.seeds:
        entry = state.cache.get(candidate)
        if entry is not None and entry.complete:
            out[origin] = entry.value
    return out


def drive(problem: Problem, settings: EvolutionSettings, local: LocalEvaluator, out_dir: Path, *, resume: bool,
          progress: bool, distributed: bool, finish: Callable[[Outcome], SearchResult],
          write_best: Callable[[Candidate, Scored, SearchState], None],
          pools: dict[str, LocalEvaluator] | None = None) -> SearchResult:
    """Run the engine on rank 0 (every rank scores); all ranks return rank 0's result. `pools`: other window
    sets that `finish` may score on through `outcome.pool(name)`, spread over the ranks like the evolution."""
    pools = pools or {}
    evaluator: Evaluator = DistributedEvaluator(local, pools) if distributed else local

    def pool(name: str) -> Evaluator:
        return PoolEvaluator(evaluator, name) if distributed else pools[name]  # type: ignore[arg-type]

    try:
        if distributed and evaluator.rank != 0:  # type: ignore[attr-defined]
            payload = evaluator.serve()  # type: ignore[attr-defined]
            if isinstance(payload, dict) and "error" in payload:
                raise RuntimeError(f"rank 0 failed: {payload['error']}")
            return payload
        try:
            outcome = Engine(problem, settings, evaluator, out_dir, resume=resume, progress=progress,
                             on_generation=write_best).run()
            outcome.pool = pool
            result = finish(outcome)
        except BaseException as err:
            if distributed:
                evaluator.shutdown({"error": f"{type(err).__name__}: {err}"})  # type: ignore[attr-defined]
            raise
        if distributed:
            evaluator.shutdown(result)  # type: ignore[attr-defined]
        return result
    finally:
        for scorer in (*pools.values(), local):
            scorer.close()


def run_search(recipe: Recipe, out_dir: Path, *, resume: bool = False, lm: LoadedModel | None = None,
               windows: torch.Tensor | None = None, progress: bool = True) -> SearchResult:
    """Search LongRoPE factors for `recipe.search.target`; write `out_dir/factors.json` (+ log and state).

    Example:
        >>> result = run_search(load_recipe(None, ["search.target=2k", "search.max_evals=40"]), Path("runs/s"))  # doctest: +SKIP
        >>> result.best.long_factor[:3], result.best_perplexity                                                 # doctest: +SKIP
    """
    if recipe.search.target is None:
        raise RecipeError("search.target is not set; pass --target 256k (or set search.target in the recipe)")
    out_dir = Path(out_dir)
    distributed = recipe.search.backend == "distributed"
    ranks = init_distributed(recipe.parallel.dist_backend, recipe.model.device)[1] if distributed else 1
    if lm is None:
        lm = load_stage_model(recipe, distributed)
    layout = lm.layout
    target = require_target(recipe.search.target, layout.original_length, "search.target")
    recipe = replace(recipe, search=resolve_search(recipe.search, target))
    cfg = recipe.search
    if cfg.documents < 1:
        raise RecipeError(f"search.documents must be at least 1, got {cfg.documents}")
    if cfg.validate_top < 0 or (cfg.validate_documents is not None and cfg.validate_documents < 1):
        raise RecipeError("search.validate_top must be >= 0 and search.validate_documents >= 1")
    if cfg.attention_search_evals < 2 and cfg.attention_search:
        raise RecipeError(f"search.attention_search_evals must be at least 2, got {cfg.attention_search_evals}")
    if cfg.attention_search and cfg.attention == "base":
        # `base` asks for the fine-tuned model's own temperature: keep it exactly.
        log.info("search: attention=base keeps the fine-tuned temperature; no attention search")
        recipe = replace(recipe, search=replace(cfg, attention_search=False))
        cfg = recipe.search
    settings = settings_from_search(recipe)
    fresh = validation_windows(cfg)
    if windows is None:
        windows = load_windows(recipe.data, lm.tokenizer, "search", target, cfg.documents + fresh)
    if windows.shape[-1] != target:
        raise RecipeError(f"search windows have {windows.shape[-1]} tokens, search.target is {target}")
    if len(windows) < cfg.documents + fresh:
        raise RecipeError(f"{len(windows)} search windows given, search.documents + validation windows = "
                          f"{cfg.documents + fresh} needed")
    fresh_windows = windows[:0]
    if fresh:  # the evolution scores the first `documents` windows; re-ranking the next `fresh`, unseen by it
        windows, fresh_windows = windows[:cfg.documents], windows[cfg.documents:cfg.documents + fresh]
    labels = fresh_labels = None
    if cfg.fitness == "needle":
        windows, labels = needle_windows(windows, lm.tokenizer, cfg.seed)
        if fresh:
            fresh_windows, fresh_labels = needle_windows(fresh_windows, lm.tokenizer, cfg.seed, stratum_offset=1)
    native = native_base(lm.model, layout) if layout.prescaled and not cfg.base_factors else None
    if native is not None:
        log.info("search: %s already scales RoPE (%s, %s): searching relative to it", layout.name, layout.rope_type,
                 format_length(native.target_length))
    chunk = recipe.model.loss_chunk
    local = LocalEvaluator(lm.model, layout, windows, chunk=chunk, labels=labels)
    windows_id = windows_digest(windows)
    critical, critical_rows = None, None
    if str(cfg.critical_dim).strip().lower() == "search":
        _critical_setting(cfg, layout, progressive=bool(cfg.base_factors) or native is not None)
        # Every rank scores the few boundaries itself (each holds the model; no rank idles at a collective);
        # rank 0 keeps the scores for a resume, and its choice is the one used.
        main = not distributed or is_main_process()
        book = ScoreBook(out_dir / CRITICAL_FILE if main else None, {
            "model": layout.to_dict(), "target": target, "windows": windows_id,
            **{k: getattr(cfg, k) for k in ("factor_step", "factor_min", "factor_max_ratio", "start_tokens",
                                            "start_token_choices", "attention", "fitness", "seed")}})
        critical, critical_rows = choose_critical_dim(recipe, layout, target, windows_id, local, book)
        if distributed:
            critical, critical_rows = broadcast_from_main((critical, critical_rows))
    problem = search_problem(recipe, layout, target, windows_id, native, critical=critical)
    pools: dict[str, LocalEvaluator] = {}
    if fresh:
        pools["fresh"] = LocalEvaluator(lm.model, layout, fresh_windows, chunk=chunk, labels=fresh_labels)
    if cfg.attention_search:  # the temperature is one number: it may see every search window
        pools["all"] = LocalEvaluator(
            lm.model, layout, torch.cat([windows, fresh_windows]) if fresh else windows, chunk=chunk,
            labels=None if labels is None else torch.cat([labels, fresh_labels]) if fresh else labels)
    factors_path = out_dir / FACTORS_FILE
    log.info("search: %s, target %s (s = %.3g), %d x %s windows, grid %s..%s step %s, n-hat %s, %d evaluations "
             "planned", layout.name, format_length(target), layout.scale(target), len(windows),
             format_length(target), problem.space.factor_min, round(problem.space.factor_max, 4),
             problem.space.step, "fixed " + str(problem.space.start_choices[0]) if not problem.space.searches_start
             else "searched", settings.planned_evaluations())
    provenance = {"stage": "search", "target": target, "seed": cfg.seed, "documents": cfg.documents,
                  "model": layout.name, "racing": cfg.racing, "ranks": ranks}
    if critical_rows is not None:
        provenance["critical_dim_search"] = {"chosen": critical, "boundaries": critical_rows}
    if cfg.base_factors or native is not None:
        provenance["base_factors"] = str(cfg.base_factors) if cfg.base_factors else f"native {layout.rope_type}"

    def best_factors(candidate: Candidate, scored: Scored, state: SearchState, **extra: Any) -> FactorSet:
        info = {**provenance, "perplexity": scored.value, "evaluations": state.evaluations,
                "generation": state.generation, "time": round(state.elapsed, 2), **extra}
        if "base_factors" in provenance:
            info["relative_factor"] = list(problem.space.values(candidate))
        return problem.to_factors(candidate).with_provenance(**info)

    def write_best(candidate: Candidate, scored: Scored, state: SearchState) -> None:
        best_factors(candidate, scored, state, status="running").save(factors_path, layout)

    def finish(outcome: Outcome) -> SearchResult:
        state = outcome.state
        seeds = seed_scores(problem, state)
        chosen, perplexity, extra = refine(outcome, state)
        best = best_factors(chosen, state.cache[chosen], state, status="complete", stopped=state.stopped,
                            seed_perplexity=seeds, counters=state.counters,
                            search=recipe_to_dict(recipe.search), **extra)
        if "attention_search" in extra:
            best = replace(best, attention=extra["attention_search"]["attention"], attention_policy="searched")
        best.save(factors_path, layout)
        mark_complete(out_dir, "search", factors_path, perplexity=perplexity,
                      evaluations=state.evaluations, stopped=state.stopped, seconds=round(state.elapsed, 2))
        return SearchResult(best=best, best_perplexity=perplexity, evaluations=state.evaluations,
                            factors_path=factors_path, history=state.history, stopped=state.stopped,
                            seconds=state.elapsed, counters=dict(state.counters), seed_perplexity=seeds)

    def refine(outcome: Outcome, state: SearchState) -> tuple[Candidate, float, dict[str, Any]]:
        """Re-rank the top candidates on the fresh windows, then search the temperature (scored over the ranks)."""
        chosen, perplexity, extra = outcome.best, outcome.best_score.value, {}
        if not (cfg.validate_top or cfg.attention_search):
            return chosen, perplexity, extra
        book = ScoreBook(out_dir / REFINE_FILE, {"search": problem.fingerprint, "fresh": windows_digest(
            fresh_windows) if fresh else None})
        if cfg.validate_top:
            top = [c for c in state.parents[:cfg.validate_top] if state.cache[c].complete]
            chosen, perplexity, rows = validate_top(top, problem.to_factors, outcome.pool("fresh"), book)
            for row, candidate in zip(rows, top, strict=True):
                row["fitness_perplexity"] = state.cache[candidate].value
            extra["validation"] = {"windows": fresh, "candidates": rows, "chosen_rank": top.index(chosen)}
        if cfg.attention_search:
            tuned, trace = search_attention(problem.to_factors(chosen), outcome.pool("all"), book,
                                            cfg.attention_search_evals)
            if trace:
                best_score = min(t["perplexity"] for t in trace)
                extra["attention_search"] = {"attention": tuned.attention, "windows": cfg.documents + fresh,
                                             "perplexity": best_score, "trace": trace}
        return chosen, perplexity, extra

    started = time.monotonic()
    result = drive(problem, settings, local, out_dir, resume=resume, progress=progress, distributed=distributed,
                   finish=finish, write_best=write_best, pools=pools)
    if not distributed or is_main_process():
        log.info("search finished in %.1f s: perplexity %.4f at %s, factors in %s", time.monotonic() - started,
                 result.best_perplexity, format_length(target), result.factors_path)
    return result

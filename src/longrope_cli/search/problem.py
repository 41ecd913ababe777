"""What `longrope search` searches: the space, the seeds and the candidate -> FactorSet map for one model and target.

Search space (paper): lambda_i on the grid 1.0, 1.01, ... up to 1.25 s (s = target / original), non-
decreasing from high to low frequency; n-hat from {0, 1, 2, 4, ..., 256} or fixed (0 exports to plain
transformers). Seeds: PI, NTK and YaRN at the target (snapped to the grid), plus `search.seed_factors`.

Progressive mode (`search.base_factors`, the paper's 2048k search on the 256k fine-tuned model): the
search runs on factors relative to the fine-tuned model's, absolute = relative x base, with the grid and
the seeds built for s' = target / base target. YaRN's ramp there reads the fine-tuned model's own
wavelengths (theta_i / b_i over the fine-tuning window), not the original model's.

LongRoPE2's critical dimension (`search.critical_dim`) narrows the space: from the critical pair on, lambda_i
is searched in [s, 1.25 s]; below it lambda_i follows lambda_cd NTK-like. `critical_dim=search` first moves
the boundary (`choose_critical_dim`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from longrope_cli.errors import RecipeError
from longrope_cli.lengths import format_length
from longrope_cli.numbers import digest, json_number, read_number
from longrope_cli.recipe import Recipe, SearchConfig
from longrope_cli.rope.baselines import baseline_factors, yarn_relative_factors
from longrope_cli.rope.factors import FactorSet, attention_factor, load_factors
from longrope_cli.rope.layout import RopeLayout
from longrope_cli.search.engine import EvolutionSettings, Problem
from longrope_cli.search.evaluator import Evaluator
from longrope_cli.search.evolution import Candidate, SearchSpace
from longrope_cli.search.refine import ScoreBook
from longrope_cli.search.state import SearchState

log = logging.getLogger(__name__)


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


def critical_setting(cfg: SearchConfig, layout: RopeLayout, progressive: bool = False) -> int | None:
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


def windows_digest(windows: torch.Tensor | Sequence[torch.Tensor]) -> str:
    """A short hash of the fitness windows: a checkpoint is only valid for the same tokens."""
    sha = hashlib.sha1()
    for w in [windows] if isinstance(windows, torch.Tensor) else windows:
        sha.update(str(tuple(w.shape)).encode())
        sha.update(w.to(torch.int64).cpu().numpy().tobytes())
    return sha.hexdigest()[:16]


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
    cd = critical_setting(cfg, layout, progressive=base is not None)
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
        "base_factors": digest(list(base.long_factor)) if base else None,
        "seeds": digest([[*c.to_json(), o] for c, o in seeds]),
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
        rows.append({"critical_dim": option, "perplexity": json_number(best),
                     "seed": best_origin if math.isfinite(best) else None})
        log.info("critical dimension %s: best seed %.4f", option, best)

    def rank(row: dict[str, Any]) -> tuple[float, int]:
        value = read_number(row["perplexity"])
        distance = abs(row["critical_dim"] - auto) if row["critical_dim"] != "off" else layout.pairs
        return value, distance

    chosen = min(rows, key=rank)
    if chosen["perplexity"] == "inf":
        raise RecipeError("search.critical_dim=search: every boundary's seeds scored inf (NaN or overflow); "
                          "check the model and search.target, or set search.critical_dim=off")
    log.info("critical dimension: %s (auto: %d)", chosen["critical_dim"], auto)
    return chosen["critical_dim"], rows


def seed_scores(problem: Problem, state: SearchState) -> dict[str, float]:
    """Perplexity of each seed (PI, NTK, YaRN as snapped to the grid) from the score cache."""
    out = {}
    for candidate, origin in problem.seeds:
        entry = state.cache.get(candidate)
        if entry is not None and entry.complete:
            out[origin] = entry.value
    return out


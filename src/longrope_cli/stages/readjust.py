"""`run_readjust`: search short factors for the extended model, so short contexts do not pay for the long ones.

transformers' `rope_type: longrope` uses `short_factor` while a sequence fits in the original window and
`long_factor` beyond it. After extension the model runs short inputs with whatever short factors the file
holds; the paper searches them again at 4k and 8k on the original window with a lower ceiling. The
same engine as `longrope search` does it (no second implementation):

- candidate: the long factor set with `short_factor` replaced; n-hat stays the long set's (0 exports);
  the attention factor stays the long set's, because transformers applies it at every length;
- grid: `readjust.factor_min` (1.0) to `readjust.factor_max`, step `readjust.factor_step`, non-decreasing;
- seeds: no interpolation (all 1.0), NTK and PI up to the ceiling, the long factors clipped to it, and the
  file's previous short factors if it has some;
- fitness: mean perplexity over `readjust.lengths` (each <= the original window) of search-split windows;
- never worse than not readjusting: if the long factors score better at the short lengths than every short set
  under the ceiling, they become the short factors (with a warning).

Output: `DIR/factors.json` with both `long_factor` and `short_factor`, ready for `longrope export`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from longrope_cli.data import load_windows
from longrope_cli.errors import RecipeError
from longrope_cli.evaluate.perplexity import score_perplexity
from longrope_cli.lengths import format_length
from longrope_cli.models import LoadedModel, load_recipe_model
from longrope_cli.recipe import ReadjustConfig, Recipe, recipe_to_dict
from longrope_cli.rope.baselines import ntk_factors
from longrope_cli.rope.factors import FactorSet, load_factors
from longrope_cli.rope.layout import RopeLayout
from longrope_cli.rope.rotary import install_factors
from longrope_cli.runtime import init_distributed
from longrope_cli.search.engine import EvolutionSettings, Outcome, Problem
from longrope_cli.search.evaluator import LocalEvaluator
from longrope_cli.search.evolution import Candidate, SearchSpace
from longrope_cli.search.problem import windows_digest
from longrope_cli.search.state import STATE_FILE, Scored, SearchState
from longrope_cli.stages.folder import StageFolder, refuse_overwrite, stage_folder
from longrope_cli.stages.search import FACTORS_FILE, SearchResult, drive

log = logging.getLogger(__name__)

DEFAULT_LENGTHS = ReadjustConfig().lengths


def readjust_lengths(cfg: ReadjustConfig, layout: RopeLayout) -> list[int]:
    """The lengths scored; each must fit the original window (else transformers would use the long factors).
    The defaults (4k, 8k) on a model with a smaller window become half and all of that window."""
    lengths = list(cfg.lengths)
    original = layout.original_length
    if lengths == DEFAULT_LENGTHS and max(lengths) > original:
        lengths = sorted({max(2, original // 2), original})
        log.warning("readjust: the default lengths 4k, 8k exceed %s's original window %s; using %s",
                    layout.name, format_length(original), ", ".join(map(format_length, lengths)))
    too_long = [n for n in lengths if n > original]
    if too_long or not lengths:
        raise RecipeError(
            f"readjust.lengths {', '.join(map(format_length, too_long))} exceed the original window "
            f"{format_length(original)}: short factors only apply within it; pass e.g. --lengths "
            f"{format_length(max(2, original // 2))},{format_length(original)}")
    return lengths


def readjust_settings(recipe: Recipe) -> EvolutionSettings:
    """Readjust's sizes in the paper's proportions: half survive, a quarter each mutate and cross."""
    cfg = recipe.readjust
    quarter = max(1, cfg.population // 4)
    return EvolutionSettings(
        population=cfg.population, survivors=max(1, cfg.population // 2), mutations=quarter, crossovers=quarter,
        mutation_prob=cfg.mutation_prob, iterations=cfg.iterations, seed=cfg.seed,
        max_evals=cfg.max_evals, max_minutes=cfg.max_minutes, patience=cfg.patience,
    ).check("readjust")


def readjust_problem(recipe: Recipe, layout: RopeLayout, long_set: FactorSet, windows_id: str) -> Problem:
    cfg = recipe.readjust
    space = SearchSpace(layout.pairs, cfg.factor_min, cfg.factor_max, cfg.factor_step, (long_set.start_tokens,))
    if long_set.start_tokens:
        log.warning("readjust: the long factors keep n-hat=%d start tokens; plain transformers cannot export them",
                    long_set.start_tokens)
    base = replace(long_set, provenance={}, method="longrope")

    def to_factors(candidate: Candidate) -> FactorSet:
        return replace(base, short_factor=space.values(candidate))

    start = long_set.start_tokens
    ceiling_scale = layout.original_length * cfg.factor_max  # a "target" at which NTK/PI reach the ceiling
    seeds = [
        (space.snap([1.0] * layout.pairs, start), "none"),
        (space.snap(ntk_factors(layout, int(round(ceiling_scale))).long_factor, start), "ntk"),
        (space.snap([cfg.factor_max] * layout.pairs, start), "pi"),
        (space.snap(long_set.long_factor, start), "long factors clipped"),
    ]
    if long_set.short_factor is not None:
        seeds.append((space.snap(long_set.short_factor, start), "previous short factors"))
    fingerprint = {
        "stage": "readjust", "model": layout.to_dict(), "windows": windows_id, "space": space.describe(),
        "long_factor": list(long_set.long_factor), "attention": long_set.attention,
        "seeds": [[*c.to_json(), o] for c, o in seeds],
        **{k: getattr(cfg, k) for k in ("seed", "population")}, "mutation_prob": cfg.mutation_prob,
    }
    return Problem(space=space, seeds=seeds, to_factors=to_factors, fingerprint=fingerprint, label="readjust")


def run_readjust(recipe: Recipe, out_dir: Path, *, resume: bool = False, lm: LoadedModel | None = None,
                 progress: bool = True, scorer: Callable[..., Any] = score_perplexity) -> SearchResult:
    """Search `short_factor` for the long factor file `recipe.readjust.factors`; write `out_dir/factors.json`
    with both lists (export it with `longrope export`). `scorer` scores the per-length report and the
    never-worse check (`evaluate.perplexity.score_perplexity`).

    Example:
        >>> run_readjust(load_recipe(None, ["readjust.factors=runs/search-2k/factors.json",
        ...                                 "readjust.lengths=128,256"]), Path("runs/readjust"))  # doctest: +SKIP
    """
    cfg = recipe.readjust
    if not cfg.factors:
        raise RecipeError("readjust.factors is not set; pass --factors runs/search-256k/factors.json")
    load_factors(cfg.factors)  # a bad file fails before a large model loads
    out_dir = Path(out_dir)
    distributed = cfg.backend == "distributed"
    if distributed:
        init_distributed(recipe.parallel.dist_backend, recipe.model.device)
    if recipe.parallel.context_parallel > 1:  # a recipe-wide setting, made for the long stages
        log.info("readjust: short windows fit one rank; parallel.context_parallel=%d is not used here, every rank "
                 "scores whole candidates", recipe.parallel.context_parallel)
    with stage_folder("readjust", recipe, out_dir) as folder:
        return _readjust(recipe, lm or load_recipe_model(recipe.model), folder, resume=resume, progress=progress,
                         distributed=distributed, scorer=scorer)


def _readjust(recipe: Recipe, lm: LoadedModel, folder: StageFolder, *, resume: bool, progress: bool,
              distributed: bool, scorer: Callable[..., Any]) -> SearchResult:
    cfg, layout, out_dir = recipe.readjust, lm.layout, folder.out
    settings = readjust_settings(recipe)
    long_set = load_factors(cfg.factors, layout)
    if not long_set.target_length or long_set.target_length <= layout.original_length:
        raise RecipeError(f"readjust.factors {cfg.factors!r} has no target beyond the original window "
                          f"{format_length(layout.original_length)}; give the factors of the extended model")
    lengths = readjust_lengths(cfg, layout)
    groups = [load_windows(recipe.data, lm.tokenizer, "search", n, cfg.documents) for n in lengths]
    problem = readjust_problem(recipe, layout, long_set, windows_digest(groups))
    refuse_overwrite(out_dir, "readjust", resume, STATE_FILE)
    folder.open()  # every check above: a refused readjust leaves OUT as it was
    local = LocalEvaluator(lm.model, layout, groups, chunk=recipe.model.loss_chunk, scoring=recipe.model.scoring)
    factors_path = out_dir / FACTORS_FILE
    log.info("readjust: %s, short factors at %s, grid %s..%s, %d evaluations planned", layout.name,
             ", ".join(map(format_length, lengths)), problem.space.factor_min, problem.space.factor_max,
             settings.planned_evaluations())
    provenance: dict[str, Any] = {"stage": "readjust", "long_factors_from": str(cfg.factors), "lengths": lengths,
                                  "seed": cfg.seed, "documents": cfg.documents, "model": layout.name}

    def with_info(candidate: Candidate, scored: Scored, state: SearchState, **extra: Any) -> FactorSet:
        return problem.to_factors(candidate).with_provenance(
            **provenance, perplexity=scored.value, evaluations=state.evaluations, generation=state.generation,
            time=round(state.elapsed, 2), **extra)

    def write_best(candidate: Candidate, scored: Scored, state: SearchState) -> None:
        with_info(candidate, scored, state, status="running").save(factors_path, layout)

    def per_length(factors: FactorSet) -> dict[str, float]:
        install_factors(lm.model, factors, layout)
        return {format_length(n): scorer(lm.model, g, chunk=recipe.model.loss_chunk, scoring=recipe.model.scoring).perplexity
                for n, g in zip(lengths, groups, strict=True)}

    def finish(outcome: Outcome) -> SearchResult:
        state = outcome.state
        best = problem.to_factors(outcome.best)
        # What readjusting bought, per length: the long factors used at short lengths (no short_factor).
        short_ppl = per_length(best)
        long_only = per_length(replace(best, short_factor=None))
        best = with_info(outcome.best, outcome.best_score, state, status="complete", stopped=state.stopped,
                         perplexity_by_length=short_ppl, long_factors_perplexity_by_length=long_only,
                         readjust=recipe_to_dict(cfg))
        long_mean = sum(long_only.values()) / len(long_only)
        if long_mean < outcome.best_score.value:
            # Never hand back something worse than not readjusting: the long factors lie above the ceiling.
            log.warning("readjust: no short factors up to %s beat the long factors at %s (%.4f vs %.4f); keeping "
                        "the long factors as short_factor (raise readjust.factor_max to search higher)",
                        cfg.factor_max, ", ".join(map(format_length, lengths)), outcome.best_score.value, long_mean)
            best = replace(best, short_factor=best.long_factor).with_provenance(
                perplexity=long_mean, perplexity_by_length=long_only, short_factor_is_long_factor=True)
        best.save(factors_path, layout)
        done = folder.complete(factors_path, perplexity=best.provenance["perplexity"],
                               evaluations=state.evaluations, stopped=state.stopped, seconds=round(state.elapsed, 2))
        log.info("readjust: short-length perplexity %s (long factors alone: %s)", short_ppl, long_only)
        return SearchResult(stage=done.stage, out=done.out, artifact=done.artifact, summary=done.summary, best=best, best_perplexity=best.provenance["perplexity"], evaluations=state.evaluations,
                            factors_path=factors_path, history=state.history, stopped=state.stopped,
                            seconds=state.elapsed, counters=dict(state.counters))

    return drive(problem, settings, local, out_dir, resume=resume, progress=progress, distributed=distributed,
                 finish=finish, write_best=write_best)

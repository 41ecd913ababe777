"""`longrope search`: from a recipe to `OUT/factors.json`, the best LongRoPE factors at the target length.

What is searched (space, seeds, critical dimension) is `search.problem`; how (evolution, racing, checkpoint)
is `search.engine`; what happens after the evolution (re-ranking, temperature) is `search.refine`. This module
wires them to the model, the windows and the output folder. Fitness: perplexity of the first
`search.documents` search-split windows of the target length.

Output folder: factors.json (rewritten after every generation), candidates.jsonl, state.json, refine.json,
critical.json (`critical_dim=search`), and what every stage folder holds (`stages.folder`). With
`search.backend=distributed` every rank calls `run_search`: rank 0 runs the evolution and writes the files,
the others score candidates, and all return the same result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from longrope_cli.context_parallel import ContextGroup, check_length, context_group, require_layerwise
from longrope_cli.data import load_windows
from longrope_cli.errors import RecipeError
from longrope_cli.evaluate.perplexity import score_perplexity
from longrope_cli.lengths import format_length
from longrope_cli.models import LoadedModel, load_recipe_model
from longrope_cli.recipe import Recipe, recipe_to_dict, require_target
from longrope_cli.rope.factors import FactorSet
from longrope_cli.rope.native import native_base
from longrope_cli.runtime import broadcast_from_main, init_distributed, is_main_process
from longrope_cli.search.engine import Engine, EvolutionSettings, Outcome, Problem
from longrope_cli.search.evaluator import DistributedEvaluator, Evaluator, LocalEvaluator, PoolEvaluator
from longrope_cli.search.evolution import Candidate
from longrope_cli.search.needle import needle_windows
from longrope_cli.search.problem import (
    choose_critical_dim,
    critical_setting,
    resolve_search,
    search_problem,
    seed_scores,
    settings_from_search,
    validation_windows,
    windows_digest,
)
from longrope_cli.search.refine import REFINE_FILE, ScoreBook, search_attention, validate_top
from longrope_cli.search.state import STATE_FILE, Scored, SearchState
from longrope_cli.stages.folder import StageFolder, StageResult, refuse_overwrite, stage_folder

log = logging.getLogger(__name__)

FACTORS_FILE = "factors.json"
CRITICAL_FILE = "critical.json"


@dataclass(kw_only=True)
class SearchResult(StageResult):
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


@dataclass
class SearchWindows:
    """The token windows of one search: the evolution's, the re-ranking's fresh ones, and the needle labels."""

    fitness: torch.Tensor
    fresh: torch.Tensor
    labels: torch.Tensor | None = None
    fresh_labels: torch.Tensor | None = None

    def every(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All search windows with their labels (the attention search: one number may see them all)."""
        if not len(self.fresh):
            return self.fitness, self.labels
        labels = None if self.labels is None else torch.cat([self.labels, self.fresh_labels])
        return torch.cat([self.fitness, self.fresh]), labels


def search_windows(recipe: Recipe, tokenizer: Any, target: int, given: torch.Tensor | None) -> SearchWindows:
    """The first `documents` search-split windows score the evolution; the next `validate_documents` (unseen by
    it) the re-ranking. The needle fitness plants a number in each and scores only its answer."""
    cfg = recipe.search
    fresh = validation_windows(cfg)
    windows = given if given is not None else load_windows(recipe.data, tokenizer, "search", target,
                                                           cfg.documents + fresh)
    if windows.shape[-1] != target:
        raise RecipeError(f"search windows have {windows.shape[-1]} tokens, search.target is {target}")
    if len(windows) < cfg.documents + fresh:
        raise RecipeError(f"{len(windows)} search windows given, search.documents + validation windows = "
                          f"{cfg.documents + fresh} needed")
    out = SearchWindows(windows[:cfg.documents], windows[cfg.documents:cfg.documents + fresh])
    if cfg.fitness == "needle":
        out.fitness, out.labels = needle_windows(out.fitness, tokenizer, cfg.seed)
        if fresh:
            out.fresh, out.fresh_labels = needle_windows(out.fresh, tokenizer, cfg.seed, stratum_offset=1)
    return out


def pick_critical_dim(recipe: Recipe, layout: Any, target: int, windows_id: str, local: LocalEvaluator,
                      out_dir: Path, distributed: bool, progressive: bool) -> tuple[int | str | None, list | None]:
    """`search.critical_dim=search`: the boundary, scored before the evolution (None: the recipe's own)."""
    cfg = recipe.search
    if str(cfg.critical_dim).strip().lower() != "search":
        return None, None
    critical_setting(cfg, layout, progressive=progressive)
    # Every rank scores the few boundaries itself (each holds the model; no rank idles at a collective);
    # rank 0 keeps the scores for a resume, and its choice is the one used.
    book = ScoreBook(out_dir / CRITICAL_FILE if is_main_process() else None, {
        "model": layout.to_dict(), "target": target, "windows": windows_id,
        **{k: getattr(cfg, k) for k in ("factor_step", "factor_min", "factor_max_ratio", "start_tokens",
                                        "start_token_choices", "attention", "fitness", "seed")}})
    if distributed:  # every rank skips the same stored scores (a context-parallel group scores in lockstep)
        book.scores = broadcast_from_main(book.scores)
    chosen = choose_critical_dim(recipe, layout, target, windows_id, local, book)
    return broadcast_from_main(chosen) if distributed else chosen


def run_search(recipe: Recipe, out_dir: Path, *, resume: bool = False, lm: LoadedModel | None = None,
               windows: torch.Tensor | None = None, progress: bool = True,
               scorer: Callable[..., Any] = score_perplexity) -> SearchResult:
    """Search LongRoPE factors for `recipe.search.target`; write `out_dir/factors.json` (+ log and state).
    `scorer`: one window's perplexity (`evaluate.perplexity.score_perplexity`; a wrapper may count or fail).

    Example:
        >>> result = run_search(load_recipe(None, ["search.target=2k", "search.max_evals=40"]), Path("runs/s"))  # doctest: +SKIP
        >>> result.best.long_factor[:3], result.best_perplexity                                                 # doctest: +SKIP
    """
    if recipe.search.target is None:
        raise RecipeError("search.target is not set; pass --target 256k (or set search.target in the recipe)")
    out_dir = Path(out_dir)
    distributed = recipe.search.backend == "distributed"
    cp = recipe.parallel.context_parallel
    if cp > 1 and not distributed:
        raise RecipeError(f"parallel.context_parallel={cp} shares each window among torchrun ranks: set "
                          "search.backend=distributed and launch with torchrun --nproc-per-node a multiple of it")
    ranks = init_distributed(recipe.parallel.dist_backend, recipe.model.device)[1] if distributed else 1
    context = context_group(cp) if distributed else None
    with stage_folder("search", recipe, out_dir) as folder:
        if lm is None:
            lm = load_recipe_model(recipe.model)
        target = require_target(recipe.search.target, lm.layout.original_length, "search.target")
        if context is not None:
            check_length(target, cp)
            require_layerwise(lm.model, target)
        recipe = replace(recipe, search=resolve_search(recipe.search, target))
        if recipe.search.attention_search and recipe.search.attention == "base":
            # `base` asks for the fine-tuned model's own temperature: keep it exactly.
            log.info("search: attention=base keeps the fine-tuned temperature; no attention search")
            recipe = replace(recipe, search=replace(recipe.search, attention_search=False))
        cfg, layout = recipe.search, lm.layout
        settings = settings_from_search(recipe)
        chosen = search_windows(recipe, lm.tokenizer, target, windows)
        native = native_base(lm.model, layout) if layout.prescaled and not cfg.base_factors else None
        problem = search_problem(recipe, layout, target, windows_digest(chosen.fitness), native)
        refuse_overwrite(out_dir, "search", resume, STATE_FILE)
        folder.open()  # every check above: a refused command leaves OUT as it was
        started = time.monotonic()
        result = _search(recipe, lm, target, chosen, native, problem, settings, folder, resume=resume,
                         progress=progress, distributed=distributed, ranks=ranks, scorer=scorer, context=context)
        if is_main_process():
            log.info("search finished in %.1f s: perplexity %.4f at %s, factors in %s", time.monotonic() - started,
                     result.best_perplexity, format_length(target), result.factors_path)
        return result


def _search(recipe: Recipe, lm: LoadedModel, target: int, windows: SearchWindows, native: FactorSet | None,
            problem: Problem, settings: EvolutionSettings, folder: StageFolder, *, resume: bool, progress: bool,
            distributed: bool, ranks: int, scorer: Callable[..., Any], context: ContextGroup | None = None
            ) -> SearchResult:
    """The search in an open folder; `problem` and `settings` as checked before it opened. `context`: this
    rank's context-parallel group (its ranks score each candidate together)."""
    cfg, layout, out_dir = recipe.search, lm.layout, folder.out
    fresh = len(windows.fresh)
    if native is not None:
        log.info("search: %s already scales RoPE (%s, %s): searching relative to it", layout.name, layout.rope_type,
                 format_length(native.target_length))
    chunk = recipe.model.loss_chunk
    scoring = recipe.model.scoring
    local = LocalEvaluator(lm.model, layout, windows.fitness, chunk=chunk, labels=windows.labels, scoring=scoring,
                           scorer=scorer, context=context)
    windows_id = problem.fingerprint["windows"]
    critical, critical_rows = pick_critical_dim(recipe, layout, target, windows_id, local, out_dir, distributed,
                                                progressive=bool(cfg.base_factors) or native is not None)
    if critical is not None:  # the sweep moved the boundary: the space is the winner's
        problem = search_problem(recipe, layout, target, windows_id, native, critical=critical)
    pools: dict[str, LocalEvaluator] = {}
    if fresh:
        pools["fresh"] = LocalEvaluator(lm.model, layout, windows.fresh, chunk=chunk, labels=windows.fresh_labels,
                                        scoring=scoring, scorer=scorer, context=context)
    if cfg.attention_search:
        every, every_labels = windows.every()
        pools["all"] = LocalEvaluator(lm.model, layout, every, chunk=chunk, labels=every_labels, scoring=scoring,
                                      scorer=scorer, context=context)
    factors_path = out_dir / FACTORS_FILE
    log.info("search: %s, target %s (s = %.3g), %d x %s windows, grid %s..%s step %s, n-hat %s, %d evaluations "
             "planned", layout.name, format_length(target), layout.scale(target), len(windows.fitness),
             format_length(target), problem.space.factor_min, round(problem.space.factor_max, 4),
             problem.space.step, "fixed " + str(problem.space.start_choices[0]) if not problem.space.searches_start
             else "searched", settings.planned_evaluations())
    provenance = {"stage": "search", "target": target, "seed": cfg.seed, "documents": cfg.documents,
                  "model": layout.name, "racing": cfg.racing, "ranks": ranks,
                  "context_parallel": recipe.parallel.context_parallel}
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
        book = ScoreBook(out_dir / REFINE_FILE, {"search": problem.fingerprint, "fresh": windows_digest(
            windows.fresh) if fresh else None})
        chosen, perplexity, extra = refine(cfg, outcome, problem, book, fresh)
        best = best_factors(chosen, state.cache[chosen], state, status="complete", stopped=state.stopped,
                            seed_perplexity=seeds, counters=state.counters,
                            search=recipe_to_dict(recipe.search), **extra)
        if "attention_search" in extra:  # the handed-on factors carry the tuned temperature, and its score
            best = replace(best, attention=extra["attention_search"]["attention"], attention_policy="searched")
            perplexity = extra["attention_search"]["perplexity"]
        refined = (len(extra.get("validation", {}).get("candidates", []))
                   + len(extra.get("attention_search", {}).get("trace", [])))
        # perplexity: the handed-on factors on the windows the last step scored; fitness_perplexity: the evolution's
        best = best.with_provenance(perplexity=perplexity, fitness_perplexity=state.cache[chosen].value,
                                    refine_evaluations=refined)
        best.save(factors_path, layout)
        done = folder.complete(factors_path, perplexity=perplexity, evaluations=state.evaluations,
                               refine_evaluations=refined, stopped=state.stopped, seconds=round(state.elapsed, 2))
        return SearchResult(stage=done.stage, out=done.out, artifact=done.artifact, summary=done.summary,
                            best=best, best_perplexity=perplexity, evaluations=state.evaluations,
                            factors_path=factors_path, history=state.history, stopped=state.stopped,
                            seconds=state.elapsed, counters=dict(state.counters), seed_perplexity=seeds)

    return drive(problem, settings, local, out_dir, resume=resume, progress=progress, distributed=distributed,
                 finish=finish, write_best=write_best, pools=pools)


def refine(cfg: Any, outcome: Outcome, problem: Problem, book: ScoreBook, fresh: int
           ) -> tuple[Candidate, float, dict[str, Any]]:
    """Re-rank the top candidates on the fresh windows, then search the temperature (scored over the ranks)."""
    state = outcome.state
    chosen, perplexity, extra = outcome.best, outcome.best_score.value, {}
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
            extra["attention_search"] = {"attention": tuned.attention, "windows": cfg.documents + fresh,
                                         "perplexity": min(t["perplexity"] for t in trace), "trace": trace}
    return chosen, perplexity, extra

"""`longrope export`: a Hugging Face model folder that plain transformers loads with the factors applied.

    OUT/model/        weights, tokenizer, config.json (`rope_type: longrope`, short_factor, long_factor),
                      factors.json; written to model.partial/ and renamed, so it appears complete or not at all

The export runs on the CPU unless the recipe's model.device says otherwise: it only copies weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

from longrope_cli.errors import RecipeError
from longrope_cli.models import LoadedModel, load_recipe_model
from longrope_cli.recipe import Recipe
from longrope_cli.rope.export import check_export, export_model
from longrope_cli.rope.factors import load_factors
from longrope_cli.stages.folder import StageResult, stage_folder

log = logging.getLogger(__name__)

MODEL_DIR = "model"


def run_export(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, lm: LoadedModel | None = None,
               progress: bool = True) -> StageResult:
    """Export `recipe.model` with `recipe.export.factors` to `out_dir/model` (the artifact).

    Example:
        >>> run_export(load_recipe(None, ["export.factors=runs/search-2k"]), "runs/export-2k").artifact  # doctest: +SKIP
    """
    from longrope_cli.api import export_factors

    cfg = recipe.export
    if not cfg.factors:
        raise RecipeError("export.factors is not set; pass --factors runs/search-2k/factors.json")
    for source in (cfg.factors, cfg.short_factors):  # fail on a bad file before loading a large model
        if source:
            load_factors(source)
    with stage_folder("export", recipe, out_dir) as folder:
        device = recipe.model.device if recipe.model.device != "auto" else "cpu"
        model = lm or load_recipe_model(recipe.model, device=device)
        factors, target = export_factors(model, cfg.factors, cfg.short_factors, cfg.target)
        check_export(factors, model.layout, Path(out_dir) / MODEL_DIR, target)
        folder.open()  # every check above: a refused export leaves OUT as it was
        path = export_model(model.model, model.tokenizer, factors, model.layout, Path(out_dir) / MODEL_DIR, target)
        log.info("exported to %s", path)
        return folder.complete(path)

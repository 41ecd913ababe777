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
    from longrope_cli.api import export

    cfg = recipe.export
    if not cfg.factors:
        raise RecipeError("export.factors is not set; pass --factors runs/search-2k/factors.json")
    for source in (cfg.factors, cfg.short_factors):  # fail on a bad file before loading a large model
        if source:
            load_factors(source)
    with stage_folder("export", recipe, out_dir) as folder:
        device = recipe.model.device if recipe.model.device != "auto" else "cpu"
        model = lm or load_recipe_model(recipe.model, device=device)
        path = export(model, cfg.factors, Path(out_dir) / MODEL_DIR, short_factors=cfg.short_factors,
                      target_length=cfg.target)
        log.info("exported to %s", path)
        return folder.complete(path)

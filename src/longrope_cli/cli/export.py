"""`longrope export`: a model directory that plain transformers loads with the factors applied."""

from __future__ import annotations

import click

from longrope_cli.cli.common import build_stage_recipe, open_stage_dir, recipe_arguments, user_errors

EPILOG = """\b
Examples:
  $ longrope export --model testbed --factors runs/search-2k/factors.json --out runs/export-2k
  $ longrope export --model ./llama2-7b --factors long.json --short-factors short.json --target 256k --out ./llama2-7b-256k
  $ longrope export recipes/tiny.yaml export.factors=runs/tiny/readjust --out runs/tiny-export
  $ python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('runs/export-2k/model')"
"""


@click.command(epilog=EPILOG)
@recipe_arguments
@click.option("--factors", default=None, type=click.Path(),
              help="Factor file or stage folder (long factors; short too if present) (recipe: export.factors).")
@click.option("--short-factors", type=click.Path(), default=None,
              help="Factor file whose factors become short_factor, e.g. from `longrope readjust` "
                   "(recipe: export.short_factors).")
@click.option("--target", default=None, help="Target length (recipe: export.target; default: the factor file's).")
@user_errors
def export(args: tuple[str, ...], model: str | None, out: str | None, device: str | None, resume: bool | None,
           progress: bool, factors: str | None, short_factors: str | None, target: str | None) -> None:
    """Write OUT/model, a Hugging Face model directory (config rope_type: longrope, short_factor, long_factor)
    that `AutoModelForCausalLM.from_pretrained(OUT/model)` loads without longrope installed.

    Factors with n-hat > 0 are refused: transformers cannot keep start tokens un-interpolated."""
    from longrope_cli.stages.export import run_export

    recipe = build_stage_recipe(args, {
        "model.name": model, "model.device": device, "output.dir": out, "export.factors": factors,
        "export.short_factors": short_factors, "export.target": target,
    })
    out_dir = open_stage_dir(recipe, "export")
    result = run_export(recipe, out_dir, progress=progress)  # an export replaces OUT/model: nothing to resume
    click.echo(f"exported to {result.artifact}")

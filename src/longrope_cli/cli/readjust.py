"""`longrope readjust`: search short factors on the extended model (the final factor file)."""

from __future__ import annotations

import click

from longrope_cli.cli.common import build_stage_recipe, open_stage_dir, recipe_arguments, user_errors

EPILOG = """\b
Examples:
  $ longrope readjust --model testbed --factors runs/search-2k/factors.json --lengths 128,256 --out runs/readjust-2k
  $ longrope readjust --model ./ft-256k --factors ./ft-256k/factors.json --lengths 4k,8k readjust.max_evals=300
  $ longrope export --model ./ft-256k --factors runs/readjust/factors.json --out ./llama2-7b-256k
"""


@click.command(epilog=EPILOG)
@recipe_arguments
@click.option("--factors", default=None, help="Factor file of the extended model (recipe: readjust.factors).")
@click.option("--lengths", default=None, help="Short lengths scored, within the original window "
                                              "(recipe: readjust.lengths; default 4k,8k).")
@click.option("--max-evals", type=int, default=None, help="Stop after N fitness evaluations (recipe: readjust.max_evals).")
@user_errors
def readjust(args: tuple[str, ...], model: str | None, out: str | None, device: str | None, resume: bool | None,
             progress: bool, factors: str | None, lengths: str | None, max_evals: int | None) -> None:
    """Search short_factor for an extended model's factor file (kept: long_factor, n-hat, attention).

    Writes OUT/factors.json with short_factor and long_factor (export it with `longrope export`),
    beside OUT/candidates.jsonl and OUT/state.json (checkpoint for --resume)."""
    from longrope_cli.runtime import is_main_process
    from longrope_cli.stages.readjust import run_readjust

    recipe = build_stage_recipe(args, {
        "model.name": model, "model.device": device, "output.dir": out, "readjust.factors": factors,
        "readjust.lengths": lengths, "readjust.max_evals": max_evals, "output.resume": resume,
    })
    out_dir = open_stage_dir(recipe, "readjust")
    result = run_readjust(recipe, out_dir, resume=recipe.output.resume, progress=progress and is_main_process())
    if is_main_process():
        click.echo(f"short-length perplexity {result.best_perplexity:.4f} after {result.evaluations} evaluations; "
                   f"factors: {result.factors_path}")

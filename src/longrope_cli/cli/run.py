"""`longrope run`: a recipe's stages in order (see longrope_cli.pipeline)."""

from __future__ import annotations

import click

from longrope_cli.cli.common import setup_logging, user_errors

EPILOG = """\b
Examples:
  $ longrope run tiny                                       # a bundled recipe by name (longrope recipe ls)
  $ longrope run recipes/tiny.yaml                          # search -> finetune -> search -> readjust -> eval
  $ longrope run recipes/tiny.yaml --dry-run                # the stages, their folders and commands
  $ longrope run recipes/tiny.yaml finetune.steps=10        # for every stage
  $ longrope run recipes/tiny.yaml search-16k.search.iterations=2   # for one stage
  $ longrope run recipes/llama2-7b-2m.yaml --out /scratch/llama2-2m
  $ make recipe-tiny
\b
Precedence per stage: recipe sections < the stage's overrides < KEY=VALUE < STAGE.KEY=VALUE.
${name} in a value is stage `name`'s output folder, OUT/name. Stages whose folder holds complete.json
are skipped, so rerunning a killed pipeline resumes it; delete a stage folder to redo that stage.
"""


@click.command(epilog=EPILOG)
@click.argument("recipe_path", metavar="RECIPE.yaml|NAME")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE | STAGE.KEY=VALUE]...")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Root of the stage folders (recipe: output.dir; default runs/<recipe name>).")
@click.option("--dry-run", is_flag=True, help="Print the stages and their commands; run nothing.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Live progress bars.")
@user_errors
def run(recipe_path: str, overrides: tuple[str, ...], out: str | None, dry_run: bool, progress: bool) -> None:
    """Run the stages listed under `stages:` in RECIPE.yaml (or the bundled recipe NAME), each reading the
    previous outputs."""
    from longrope_cli.pipeline import describe_plan, plan_pipeline, run_pipeline

    if dry_run:
        root, plan = plan_pipeline(recipe_path, overrides, out_root=out)
        click.echo(describe_plan(recipe_path, root, plan))
        return
    root, _ = plan_pipeline(recipe_path, overrides, out_root=out)  # validate every stage before logging to disk
    setup_logging(root)
    run_pipeline(recipe_path, overrides, out_root=out, progress=progress)

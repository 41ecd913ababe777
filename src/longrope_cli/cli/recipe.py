"""`longrope recipe`: show the resolved recipe, validate it, or list every key with its meaning."""

from __future__ import annotations

import click
import yaml

from longrope_cli.cli.common import split_recipe_args, user_errors

EPILOG = """\b
Examples:
  $ longrope recipe show recipes/tiny.yaml search.population=8
  $ longrope recipe validate recipes/llama2-7b-2m.yaml
  $ longrope recipe fields
"""


@click.group(epilog=EPILOG)
def recipe() -> None:
    """Inspect recipe files (YAML; precedence: defaults < file < key=value < flags)."""


@recipe.command()
@click.argument("args", nargs=-1, metavar="[RECIPE.yaml] [KEY=VALUE]...")
@user_errors
def show(args: tuple[str, ...]) -> None:
    """Print the fully resolved recipe (defaults filled in, overrides applied)."""
    from longrope_cli.recipe import load_recipe, recipe_to_dict

    path, overrides = split_recipe_args(args)
    click.echo(yaml.safe_dump(recipe_to_dict(load_recipe(path, overrides)), sort_keys=False), nl=False)


@recipe.command()
@click.argument("args", nargs=-1, required=True, metavar="RECIPE.yaml [KEY=VALUE]...")
@user_errors
def validate(args: tuple[str, ...]) -> None:
    """Check a recipe: unknown keys, wrong types and bad lengths are one-line errors (exit 2)."""
    from longrope_cli.recipe import load_recipe

    path, overrides = split_recipe_args(args)
    resolved = load_recipe(path, overrides)
    stages = ", ".join(s.name for s in resolved.stages) or "no stages"
    click.echo(f"ok: {path or 'defaults'} ({stages})")


@recipe.command()
def fields() -> None:
    """List every recipe key with its type, default and meaning."""
    from rich.console import Console
    from rich.table import Table

    from longrope_cli.recipe import field_docs

    table = Table(show_lines=False)
    for column in ("key", "type", "default", "meaning"):
        table.add_column(column, overflow="fold")
    for row in field_docs():
        table.add_row(*row)
    Console().print(table)

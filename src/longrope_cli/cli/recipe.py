"""`longrope recipe`: list and copy out the bundled recipes, show the resolved recipe, validate it, or list
every key with its meaning."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path
from typing import Any

import click
import yaml

from longrope_cli.cli.common import RECIPE_ARGS, recipe_file, split_recipe_args, user_errors
from longrope_cli.errors import RecipeError

EPILOG = """\b
Examples:
  $ longrope recipe ls                                     # the bundled recipes
  $ longrope recipe cp tiny my-tiny.yaml                   # copy one out to edit it
  $ longrope recipe show tiny search.population=8          # a bundled name or a file
  $ longrope recipe validate recipes/llama2-7b-2m.yaml
  $ longrope recipe fields
\b
Wherever a RECIPE.yaml is accepted, a bare NAME that is not an existing file is the bundled recipe
of that name: `longrope run tiny` works from any folder.
"""

LS_EPILOG = """\b
Examples:
  $ longrope recipe ls
  $ longrope run tiny --dry-run                            # run one by name
"""

CP_EPILOG = """\b
Examples:
  $ longrope recipe cp tiny my-tiny.yaml
  $ longrope recipe cp llama2-7b-2m configs/                # into a folder: configs/llama2-7b-2m.yaml
  $ longrope recipe cp tiny my-tiny.yaml --force           # overwrite
  $ longrope run my-tiny.yaml
"""


@click.group(epilog=EPILOG)
def recipe() -> None:
    """List, copy, show and validate recipes (YAML; precedence: defaults < file < key=value < flags)."""


@recipe.command(name="ls", epilog=LS_EPILOG, short_help="List the bundled recipes.")
@user_errors
def ls() -> None:
    """List the bundled recipes: name and the first line of each file's header."""
    from longrope_cli.bundled import bundled_recipes, recipe_title

    found = bundled_recipes()
    if not found:
        raise RecipeError("no bundled recipes found in the installed package; reinstall longrope-cli")
    width = max(len(name) for name in found)
    for name, path in found.items():
        click.echo(f"{name:<{width}}  {recipe_title(path)}".rstrip())


@recipe.command(name="cp", epilog=CP_EPILOG, short_help="Copy a bundled recipe to a file.")
@click.argument("name", metavar="NAME")
@click.argument("dest", metavar="FILE")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@user_errors
def cp(name: str, dest: str, force: bool) -> None:
    """Copy the bundled recipe NAME to FILE (a folder: FOLDER/NAME.yaml) to edit and run it."""
    from longrope_cli.bundled import SUFFIXES, find_bundled

    source = find_bundled(name[: -len(Path(name).suffix)] if name.endswith(SUFFIXES) else name)
    target = Path(dest)
    if target.is_dir():
        target = target / source.name
    elif dest.endswith(("/", "\\")):
        raise RecipeError(f"folder {dest!r} does not exist; create it first")
    if target.exists() and not force:
        raise RecipeError(f"{str(target)!r} exists; pass --force to overwrite it")
    if not target.parent.is_dir():
        raise RecipeError(f"folder {str(target.parent)!r} does not exist; create it first")
    try:
        shutil.copyfile(source, target)
    except OSError as err:
        raise RecipeError(f"cannot write {str(target)!r}: {err.strerror or err}") from None
    click.echo(f"copied {source.stem} to {target}")


@recipe.command()
@click.argument("args", nargs=-1, metavar=RECIPE_ARGS)
@user_errors
def show(args: tuple[str, ...]) -> None:
    """Print the fully resolved recipe (defaults filled in, overrides applied)."""
    from longrope_cli.recipe import load_recipe, recipe_to_dict

    path, overrides = split_recipe_args(args)
    click.echo(yaml.safe_dump(recipe_to_dict(load_recipe(recipe_file(path), overrides)), sort_keys=False), nl=False)


@recipe.command()
@click.argument("args", nargs=-1, required=True, metavar="RECIPE.yaml|NAME [KEY=VALUE]...")
@user_errors
def validate(args: tuple[str, ...]) -> None:
    """Check a recipe: unknown keys, wrong types and bad lengths are one-line errors (exit 2)."""
    from longrope_cli.recipe import load_recipe

    path, overrides = split_recipe_args(args)
    resolved = load_recipe(recipe_file(path), overrides)
    stages = ", ".join(s.name for s in resolved.stages) or "no stages"
    click.echo(f"ok: {path or 'defaults'} ({stages})")


FIELDS_EPILOG = """\b
Examples:
  $ longrope recipe fields                                 # a table
  $ longrope recipe fields --format plain | grep ^search   # key<TAB>type<TAB>default<TAB>help lines
  $ longrope recipe fields --format json                   # [{"key", "type", "default", "help"}, ...]
"""


def _json_default(text: str) -> Any:
    """A `field_docs` default (Python repr) as a JSON value: None -> null, '4k' -> "4k", [1, 2] -> [1, 2]."""
    from longrope_cli.outputs import strict_json

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text
    value = strict_json(value)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):  # a set, bytes, complex number...: keep the repr
        return text
    return value


def _plain_cell(text: str) -> str:
    """One field of a tab-separated line: tabs and newlines would split it."""
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


@recipe.command(epilog=FIELDS_EPILOG)
@click.option("--format", "fmt", type=click.Choice(["table", "plain", "json"]), default="table", show_default=True,
              help="table: for reading; plain: one key<TAB>type<TAB>default<TAB>help line per key; "
                   "json: a list of {key, type, default, help} objects.")
def fields(fmt: str) -> None:
    """List every recipe key with its type, default and meaning."""
    from longrope_cli.recipe import field_docs

    rows = field_docs()
    if fmt == "plain":
        for row in rows:
            click.echo("\t".join(_plain_cell(cell) for cell in row))
        return
    if fmt == "json":
        click.echo(json.dumps([{"key": key, "type": kind, "default": _json_default(default), "help": doc}
                               for key, kind, default, doc in rows], indent=2, allow_nan=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for column in ("key", "type", "default", "meaning"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console().print(table)

"""The recipes shipped inside the package (longrope_cli/recipes/*.yaml; `recipes/` in a checkout links there).

Wherever a recipe file is accepted, a bare NAME (no .yaml, not an existing file) means the bundled recipe
of that name, so an installed wheel runs `longrope run tiny` from any folder:

    >>> sorted(bundled_recipes())
    ['llama2-7b-2m', 'mistral-7b-2m', 'tiny']
    >>> resolve_recipe("tiny").name
    'tiny.yaml'
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from longrope_cli.errors import RecipeError

SUFFIXES = (".yaml", ".yml")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def recipe_dir() -> Path:
    """The package's recipes folder (a plain folder: wheels install unzipped)."""
    return Path(str(resources.files("longrope_cli") / "recipes"))


def bundled_recipes() -> dict[str, Path]:
    """name -> file for every bundled recipe, sorted by name."""
    folder = recipe_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in SUFFIXES and p.is_file()}


def recipe_title(path: str | Path) -> str:
    """The recipe's first comment line, without '#' and a trailing ':' ("" when it has none)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            text = line.strip()
            if not text:
                continue
            if not text.startswith("#"):
                return ""
            title = text.lstrip("#").strip().rstrip(":").strip()
            if title:
                return title
    return ""


def is_bare_name(arg: str) -> bool:
    """`tiny`, not `tiny.yaml`, `./tiny` or `dir/tiny`."""
    return bool(_NAME.match(arg)) and not arg.endswith(SUFFIXES)


def bundled_names() -> str:
    return ", ".join(bundled_recipes()) or "none installed"


def find_bundled(name: str) -> Path:
    """The bundled recipe NAME, or a one-line RecipeError naming the bundled ones."""
    found = bundled_recipes().get(name)
    if found is None:
        raise RecipeError(f"unknown recipe {name!r}: not a file and not a bundled recipe "
                          f"(bundled: {bundled_names()}; `longrope recipe ls` describes them)")
    return found


def resolve_recipe(arg: str | Path) -> Path:
    """A recipe argument -> the file to read: an existing file as is, a bare name (a str) -> the bundled
    recipe of that name; otherwise a one-line RecipeError."""
    path = Path(arg)
    if path.is_file():
        return path
    if isinstance(arg, str) and is_bare_name(arg):
        return find_bundled(arg)
    raise RecipeError(f"recipe file {str(arg)!r} not found; pass a YAML file or the name of a bundled recipe "
                      f"({bundled_names()})")

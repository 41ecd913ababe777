"""What every command shares: recipe arguments, logging, one-line errors."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from longrope_cli.errors import LongRopeError, RecipeError

# Busy-waiting OpenMP threads fight each other on shared machines (13x slower training steps measured on
# 2 cores); set before torch is imported by any command.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A recipe argument: a YAML file, or the name of a bundled recipe (`longrope recipe ls`).
RECIPE_ARGS = "[RECIPE.yaml|NAME] [KEY=VALUE]..."


def split_recipe_args(args: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """`[RECIPE.yaml | NAME] [key=value ...]` -> (recipe argument or None, overrides). NAME, a bare word that
    is not an existing file, is a bundled recipe (`longrope recipe ls`); load it with `recipe_file`."""
    from longrope_cli.bundled import bundled_names, bundled_recipes, is_bare_name

    recipe, overrides = None, []
    for arg in args:
        if "=" in arg:
            overrides.append(arg)
        elif recipe is None and (arg.endswith((".yaml", ".yml")) or Path(arg).is_file()
                                 or (is_bare_name(arg) and arg in bundled_recipes())):
            recipe = arg
        else:
            raise RecipeError(f"unexpected argument {arg!r}: give an optional RECIPE.yaml or bundled recipe name "
                              f"({bundled_names()}), then key=value overrides")
    return recipe, overrides


def recipe_file(recipe: str | None) -> Path | None:
    """The file a recipe argument names: itself, or the bundled recipe of that name."""
    from longrope_cli.bundled import resolve_recipe

    return None if recipe is None else resolve_recipe(recipe)


def recipe_arguments(func: Callable) -> Callable:
    """Add `[RECIPE.yaml | NAME] [key=value ...]` and the flags every stage shares: --model, --out, --device,
    --resume/--no-resume and --progress/--no-progress."""
    func = click.option("--progress/--no-progress", default=True, show_default=True,
                        help="Live progress bars (off: plain log lines, with a heartbeat during long work).")(func)
    func = click.option("--resume/--no-resume", default=None,
                        help="Continue the run checkpointed in OUT (recipe: output.resume).")(func)
    func = click.argument("args", nargs=-1, metavar=RECIPE_ARGS)(func)
    func = click.option("--device", default=None, help="auto, cpu, cuda, cuda:1 (recipe: model.device).")(func)
    func = click.option("--out", "out", default=None, type=click.Path(file_okay=False),
                        help="Output folder for this stage (recipe: output.dir).")(func)
    func = click.option("--model", "model", default=None,
                        help="Local HF directory, .gguf file, or 'testbed' (recipe: model.name).")(func)
    return func


def build_stage_recipe(args: tuple[str, ...], flags: dict[str, Any]):
    """defaults < recipe file < key=value overrides < flags."""
    from longrope_cli.recipe import load_recipe

    path, overrides = split_recipe_args(args)
    return load_recipe(recipe_file(path), overrides, flags)


def setup_logging(out_dir: str | Path | None = None, verbose: bool = False) -> None:
    """Rich console logging, plus a plain-text log file in the stage's output folder."""
    from rich.logging import RichHandler

    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    console = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(console)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        from longrope_cli.stages.folder import log_file_handler

        root.addHandler(log_file_handler(out_dir))
    for noisy in ("transformers", "urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def user_errors(func: Callable) -> Callable:
    """Print user mistakes as one line on stderr (exit 2) instead of a traceback; Ctrl-C exits 130."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except LongRopeError as err:
            message = " ".join(str(err).split())
            click.echo(f"error: {message}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            ctx = click.get_current_context(silent=True)
            how = ("rerun the same command: complete stages are skipped, the interrupted one resumes"
                   if ctx is not None and ctx.info_name == "run" else "rerun the same command with --resume")
            click.echo(f"interrupted: finished work is saved; {how}", err=True)
            sys.exit(130)

    return wrapper


def default_out(stage: str, target: int | None = None) -> str:
    from longrope_cli.lengths import format_length

    return str(Path("runs") / (f"{stage}-{format_length(target)}" if target else stage))


def open_stage_dir(recipe: Any, stage: str, target: int | None = None) -> Path:
    """Resolve the stage's output folder (default runs/<stage>[-<target>]) and log to the console; the stage
    itself fills the folder (`stages.folder`: recipe.yaml, env.json, log.txt, complete.json) on rank 0."""
    recipe.output.dir = recipe.output.dir or default_out(stage, target)
    setup_logging()
    return Path(recipe.output.dir)

"""`longrope`: the command group. Commands are imported lazily so that --help is instant."""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import sys

import click

from longrope_cli import __version__
from longrope_cli.stages import STAGES

# Every stage command is `longrope_cli.cli.<module>.<function>`; `run` and `recipe` are not stages.
STAGE_CLI = {"search": "search", "finetune": "finetune", "readjust": "readjust", "eval": "evaluate",
             "export": "export"}
COMMANDS = {
    **{name: (f"longrope_cli.cli.{STAGE_CLI[name]}", STAGE_CLI[name]) for name in STAGES},
    "run": ("longrope_cli.cli.run", "run"),
    "recipe": ("longrope_cli.cli.recipe", "recipe"),
}

SHORT_HELP = {
    **{name: spec.help for name, spec in STAGES.items()},
    "run": "Run a recipe's stages in order (resumes completed stages).",
    "recipe": "List, copy, show, validate and document recipes (bundled or files).",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """click's own usage errors (a bad option value, a missing argument) as one `error:` line, like ours."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as err:
            where = err.ctx.command_path if err.ctx is not None else "longrope"
            click.echo(f"error: {err.format_message()} (see `{where} --help`)", err=True)
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.ClickException as err:
            click.echo(f"error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        sys.exit(code if isinstance(code, int) else 0)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SHORT_HELP[name]) for name in COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


EPILOG = """\b
Examples:
  $ longrope search --model testbed --target 2k --out runs/search-2k
  $ longrope eval --model testbed --lengths 256,512,1k,2k --methods none,pi,yarn,runs/search-2k/factors.json
  $ longrope finetune recipes/tiny.yaml --factors runs/search-2k/factors.json --target 2k
  $ longrope run recipes/tiny.yaml            # the whole progressive pipeline
  $ longrope run tiny --dry-run               # a bundled recipe by name (longrope recipe ls / recipe cp)
  $ longrope recipe validate recipes/llama2-7b-2m.yaml search.population=32
"""


@click.group(cls=LazyGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="longrope")
def cli() -> None:
    """LongRoPE context-window extension for Hugging Face RoPE models.

    Every stage takes an optional RECIPE.yaml (or a bundled recipe's NAME), then key=value overrides, then flags;
    precedence: defaults < recipe < key=value < flags.
    """


def main() -> None:
    if _several_ranks():
        atexit.register(_end_before_cpp_teardown)  # registered first, so it runs after every other handler
    try:
        cli(prog_name="longrope")
    except SystemExit as stop:
        _exit_status["code"] = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        raise


# Under torchrun / srun, torch's C++ teardown after a finished job now and then aborts a rank (exit -6,
# "terminate called without an active exception", with no Python frame left): a good job would be marked
# failed and stop an `afterok` chain. Every output is written and closed by then, so a rank that leaves
# through SystemExit ends with os._exit once Python's own exit handlers have run. A traceback (code None)
# takes the normal way out.
_exit_status: dict[str, int | None] = {"code": None}


def _several_ranks() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 or int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1


def _end_before_cpp_teardown() -> None:
    code = _exit_status["code"]
    if code is None:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

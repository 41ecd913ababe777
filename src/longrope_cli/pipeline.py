"""`longrope run`: a recipe's stages in order, each reading the previous stages' outputs.

    stages:
      - {name: search-2k, command: search, overrides: {search.target: 2k}}
      - name: finetune-2k
        command: finetune
        overrides: {finetune.factors: "${search-2k}", finetune.target: 2k}

A stage's recipe follows the one precedence rule of every command, defaults < recipe < `key=value` < flags:
the recipe's sections < the stage's `overrides` (both part of the recipe file) < command-line `key=value`
overrides < command-line overrides addressed to the stage (`search-2k.search.iterations=2`). `${name}` in any string becomes that stage's output folder,
`<root>/<name>`, where root is `--out`, else `output.dir`, else `runs/<recipe file stem>`.
A stage whose folder holds complete.json is skipped; a folder without it is resumed (resume=True),
so rerunning a killed pipeline continues where it stopped. Delete a stage's folder to redo it.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from longrope_cli.bundled import resolve_recipe
from longrope_cli.errors import RecipeError
from longrope_cli.outputs import COMPLETE_MARKER, atomic_write_json, is_complete
from longrope_cli.recipe import Recipe, build_recipe, parse_override, read_recipe_file
from longrope_cli.stages import STAGES
from longrope_cli.stages.folder import StageResult, clean_partial_writes

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_REF = re.compile(r"\$\{([^}]*)\}")


@dataclass
class Stage:
    """One planned stage: its resolved recipe, output folder, and what `longrope run` will do with it."""

    index: int
    name: str
    command: str
    out: Path
    recipe: Recipe
    overrides: list[str]  # key=value that turn the recipe file into this stage's recipe (for the CLI command)
    status: str  # "complete" (skip), "resume" (folder exists, incomplete) or "run"


@dataclass
class Outcome:
    name: str
    command: str
    status: str  # skipped, ran, resumed
    seconds: float
    out: Path
    summary: dict[str, Any] = field(default_factory=dict)


def _format_value(value: Any) -> str:
    """A `key=value` right-hand side that parse_override reads back as `value`."""
    candidates = [value] if isinstance(value, str) else []
    if isinstance(value, list | dict):
        candidates.append(yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip())
    for text in candidates:
        try:
            if "\n" not in text and yaml.safe_load(text) == value:
                return text
        except yaml.YAMLError:
            pass
    return json.dumps(value)  # JSON is YAML: numbers, quoted strings


def _substitute(value: Any, folders: dict[str, Path], where: str) -> Any:
    if isinstance(value, str):
        def replace(match: re.Match) -> str:
            name = match.group(1)
            if name not in folders:
                raise RecipeError(f"{where}: ${{{name}}} names no stage; stages are {', '.join(folders)}")
            return str(folders[name])
        return _REF.sub(replace, value)
    if isinstance(value, list):
        return [_substitute(v, folders, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, folders, f"{where}.{k}") for k, v in value.items()}
    return value


def _references(value: Any) -> set[str]:
    if isinstance(value, str):
        return set(_REF.findall(value))
    if isinstance(value, list):
        return set().union(*(_references(v) for v in value)) if value else set()
    if isinstance(value, dict):
        return set().union(*(_references(v) for v in value.values())) if value else set()
    return set()


def _dotted_with_refs(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every recipe value that mentions ${...}."""
    out = []
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.extend(_dotted_with_refs(value, dotted))
        elif _references(value):
            out.append((dotted, value))
    return out


def _status(out: Path) -> str:
    if is_complete(out):
        return "complete"
    return "resume" if out.is_dir() and any(out.iterdir()) else "run"


def plan_pipeline(recipe_path: str | Path, overrides: Sequence[str] = (), *,
                  out_root: str | Path | None = None) -> tuple[Path, list[Stage]]:
    """Resolve every stage's recipe and folder (validating all of them before anything runs). recipe_path is a
    file or the name of a bundled recipe (longrope_cli.bundled); stage commands repeat it as given."""
    raw = read_recipe_file(resolve_recipe(recipe_path))
    names = [str(s.get("name", "")) if isinstance(s, dict) else "" for s in raw.get("stages") or []]
    stage_cli: dict[str, list[str]] = {n: [] for n in names}
    global_cli = []
    for text in overrides:
        parse_override(text)  # a one-line error for anything that is not key=value
        key, value = text.split("=", 1)
        head, _, rest = key.strip().lstrip("-").partition(".")
        if head in stage_cli and rest:
            stage_cli[head].append(f"{rest}={value}")
        else:
            global_cli.append(text)
    base = build_recipe(raw, global_cli)
    if not base.stages:
        raise RecipeError(f"recipe {str(recipe_path)!r} has no stages: list them under `stages:` "
                          "(see recipes/tiny.yaml), or run one stage with `longrope search|finetune|...`")
    sections = {f for f in Recipe.__dataclass_fields__}
    for stage in base.stages:
        if not _NAME.match(stage.name) or stage.name in sections:
            raise RecipeError(f"stage name {stage.name!r} must be letters, digits, '-' or '_' (and not a recipe "
                              "section name); later stages refer to it as ${name}")
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise RecipeError(f"two stages are named {duplicate!r}; stage names must be unique")
    root = Path(out_root or base.output.dir or Path("runs") / Path(recipe_path).stem)
    folders = {s.name: root / s.name for s in base.stages}
    sections_data = {k: v for k, v in raw.items() if k != "stages"}
    shared = [f"{key}={_format_value(_substitute(value, folders, key))}"
              for key, value in _dotted_with_refs(sections_data)]
    global_cli = [f"{k}={_format_value(_substitute(v, folders, k))}" for k, v in map(parse_override, global_cli)]
    plan = []
    for index, stage in enumerate(base.stages):
        earlier = set(names[:index])
        for key, value in stage.overrides.items():
            late = _references(value) - earlier
            if late & set(names):
                raise RecipeError(f"stage {stage.name!r}: {key} refers to ${{{sorted(late)[0]}}}, which does not run "
                                  "before it; reorder the stages")
        local = [f"{k}={_format_value(_substitute(v, folders, f'{stage.name}.{k}'))}"
                 for k, v in stage.overrides.items()]
        cli = [f"{k}={_format_value(_substitute(v, folders, k))}" for k, v in map(parse_override, stage_cli[stage.name])]
        if stage.command == "export" and not any(k.startswith("export.factors=") for k in local + cli + global_cli) \
                and not base.export.factors:
            makers = [s.name for s in base.stages[:index] if STAGES[s.command].writes_factors]
            if not makers:
                raise RecipeError(f"export stage {stage.name!r} needs export.factors (no earlier stage writes "
                                  "factors)")
            local.append(f"export.factors={_format_value(str(folders[makers[-1]] / 'factors.json'))}")
        stage_overrides = shared + local + global_cli + cli
        try:
            recipe = build_recipe(sections_data, stage_overrides + [f"output.dir={_format_value(str(folders[stage.name]))}"])
        except RecipeError as err:
            raise RecipeError(f"stage {stage.name!r}: {err}") from None
        plan.append(Stage(index, stage.name, stage.command, folders[stage.name], recipe, stage_overrides,
                          _status(folders[stage.name])))
    return root, plan


def stage_command(stage: Stage, recipe_path: str | Path) -> list[str]:
    """The `longrope` command line that runs this one stage by hand (or in an sbatch job)."""
    argv = ["longrope", stage.command, str(recipe_path), *stage.overrides, "--out", str(stage.out)]
    return argv + (["output.resume=true"] if stage.status == "resume" else [])


def describe_plan(recipe_path: str | Path, root: Path, plan: list[Stage]) -> str:
    """The dry run: each stage as a comment line and its command (commented out when complete)."""
    lines = [f"# {recipe_path}: {len(plan)} stages in {root}"]
    for stage in plan:
        note = {"complete": "complete: skipped", "resume": "incomplete: resumed", "run": "to run"}[stage.status]
        lines.append(f"# [{stage.index + 1}/{len(plan)}] {stage.name}: {stage.command} -> {stage.out} ({note})")
        command = shlex.join(stage_command(stage, recipe_path))
        lines.append(("# " if stage.status == "complete" else "") + command)
    return "\n".join(lines)


def _summary(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if k not in ("stage", "finished")}


def run_pipeline(recipe_path: str | Path, overrides: Sequence[str] = (), *, out_root: str | Path | None = None,
                 progress: bool = True, runners: Mapping[str, Callable[..., StageResult]] | None = None
                 ) -> list[Outcome]:
    """Run the recipe's stages in order, skipping complete ones; print and return what each did. `runners`
    replaces stage entry points by command (tests inject stubs); the default is `stages.STAGES`.

    Example:
        >>> run_pipeline("recipes/tiny.yaml", ["finetune.steps=10"])  # doctest: +SKIP
    """
    root, plan = plan_pipeline(recipe_path, overrides, out_root=out_root)
    clean_partial_writes(root)  # a kill's temporary files, in finished stage folders too
    outcomes: list[Outcome] = []
    for stage in plan:
        if stage.status == "complete":
            log.info("[%d/%d] %s: complete, skipped (%s)", stage.index + 1, len(plan), stage.name, stage.out)
            outcomes.append(Outcome(stage.name, stage.command, "skipped", 0.0, stage.out, _summary(stage.out)))
            continue
        resume = stage.status == "resume"
        log.info("[%d/%d] %s: %s%s -> %s", stage.index + 1, len(plan), stage.name, stage.command,
                 " (resuming)" if resume else "", stage.out)
        began = time.perf_counter()
        try:
            entry = runners[stage.command] if runners and stage.command in runners else STAGES[stage.command].entry()
            result = entry(stage.recipe, stage.out, resume=resume, progress=progress)
        except BaseException:
            log.error("stage %s failed; rerun `longrope run %s` to continue from it", stage.name, recipe_path)
            raise
        seconds = time.perf_counter() - began
        if not is_complete(stage.out):
            raise RuntimeError(f"stage {stage.name} ({stage.command}) returned {result!r} without writing "
                               f"{COMPLETE_MARKER}")
        outcomes.append(Outcome(stage.name, stage.command, "resumed" if resume else "ran", seconds, stage.out,
                                _summary(stage.out)))
    atomic_write_json(root / "pipeline.json", {
        "recipe": str(recipe_path), "overrides": list(overrides),
        "stages": [{"name": o.name, "command": o.command, "status": o.status, "seconds": round(o.seconds, 1),
                    "out": str(o.out), **o.summary} for o in outcomes]})
    print_summary(outcomes, root)
    return outcomes


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_summary(outcomes: list[Outcome], root: Path | None = None) -> None:
    """The table `longrope run` ends with: what each stage did, where its artifact is, its headline numbers."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"longrope run: {root}" if root else "longrope run")
    for column in ("#", "stage", "command", "status", "time", "artifact", "result"):
        table.add_column(column, overflow="fold")
    for i, o in enumerate(outcomes, 1):
        result = ", ".join(f"{k}={_short(v)}" for k, v in o.summary.items()
                           if k not in ("artifact", "seconds") and isinstance(v, int | float | str))
        artifact = o.out / o.summary["artifact"] if o.summary.get("artifact") else o.out
        shown = artifact.relative_to(root) if root and artifact.is_relative_to(root) else artifact
        table.add_row(str(i), o.name, o.command, o.status, f"{o.seconds:.0f}s", str(shown), result)
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # logs and CI: do not wrap at 80 columns
    console.print(table)

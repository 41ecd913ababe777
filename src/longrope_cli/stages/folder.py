"""The one owner of a stage's output folder, under the CLI and under `longrope run` alike.

    OUT/recipe.yaml    the resolved recipe the stage ran with
    OUT/env.json       versions, git revision, host, command line
    OUT/log.txt        the stage's log (appended across resumes)
    OUT/complete.json  written last and atomically: the stage finished (`longrope run` skips it then)

Only rank 0 writes; every rank gets the same `StageResult`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longrope_cli.outputs import COMPLETE_MARKER, mark_complete, prepare_run_dir
from longrope_cli.runtime import is_main_process

LOG_FILE = "log.txt"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(kw_only=True)
class StageResult:
    """What every stage returns: its folder, its artifact (factors.json, model/, results.json) and the
    headline numbers it also wrote to complete.json."""

    stage: str
    out: Path
    artifact: Path
    summary: dict[str, Any] = field(default_factory=dict)


def log_file_handler(out: str | Path) -> logging.Handler:
    """A plain-text handler appending to OUT/log.txt (attached to the root logger by the caller)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(out) / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    return handler


class StageFolder:
    """An open stage folder; `complete` records the end of the stage and returns its result."""

    def __init__(self, stage: str, out: Path, main: bool) -> None:
        self.stage, self.out, self.main = stage, out, main

    def complete(self, artifact: str | Path, **summary: Any) -> StageResult:
        artifact = Path(artifact)
        if self.main:
            mark_complete(self.out, self.stage, artifact, **summary)
        return StageResult(stage=self.stage, out=self.out, artifact=artifact, summary=summary)


def completed_result(stage: str, out: str | Path) -> StageResult:
    """The result a finished stage folder recorded in complete.json (a resume of a complete stage)."""
    import json

    out = Path(out)
    data = json.loads((out / COMPLETE_MARKER).read_text(encoding="utf-8"))
    summary = {k: v for k, v in data.items() if k not in ("stage", "artifact", "finished")}
    return StageResult(stage=stage, out=out, artifact=out / data.get("artifact", "."), summary=summary)


@contextmanager
def stage_folder(stage: str, recipe: Any, out: str | Path) -> Iterator[StageFolder]:
    """Open OUT for `stage`: on rank 0 write recipe.yaml and env.json, drop a stale complete.json (this run is
    not complete until it says so again), and log to OUT/log.txt until the stage returns."""
    from longrope_cli.recipe import recipe_to_dict

    out = Path(out)
    main = is_main_process()
    handler = None
    root = logging.getLogger()
    level = root.level
    if main:
        prepare_run_dir(out, stage, recipe_to_dict(recipe))
        (out / COMPLETE_MARKER).unlink(missing_ok=True)
        if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == (out / LOG_FILE).resolve()
                   for h in root.handlers):
            handler = log_file_handler(out)
            root.addHandler(handler)
            root.setLevel(min(level, logging.INFO) if level else logging.INFO)  # the file gets INFO from a library call too
    try:
        yield StageFolder(stage, out, main)
    finally:
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
            root.setLevel(level)

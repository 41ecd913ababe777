"""The one owner of a stage's output folder, under the CLI and under `longrope run` alike.

    OUT/recipe.yaml    the resolved recipe the stage ran with
    OUT/env.json       versions, git revision, host, command line
    OUT/log.txt        the stage's log (appended across resumes)
    OUT/complete.json  written last and atomically: the stage finished (`longrope run` skips it then)

Only rank 0 writes; every rank gets the same `StageResult`.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longrope_cli.errors import LongRopeError, RecipeError
from longrope_cli.outputs import COMPLETE_MARKER, mark_complete, prepare_run_dir
from longrope_cli.runtime import is_main_process

log = logging.getLogger(__name__)

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
    """A stage folder being prepared: nothing is written until `open()` (after the stage's checks), and
    `complete` records the end of the stage and returns its result."""

    def __init__(self, stage: str, out: Path, recipe: Any, main: bool) -> None:
        self.stage, self.out, self.recipe, self.main = stage, out, recipe, main
        self.opened = False
        self.early = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
        self.handler: logging.Handler | None = None

    def open(self) -> StageFolder:
        """Write recipe.yaml and env.json, drop a stale complete.json (this run is not complete until it says so
        again) and start OUT/log.txt with what was logged while the stage checked its inputs (rank 0)."""
        import torch.distributed as dist

        from longrope_cli.recipe import recipe_to_dict

        if not self.opened and dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has run its checks on the untouched folder before rank 0 writes
        if self.main and not self.opened:
            check_writable(self.out)
            check_own_files(self.out)
            clean_partial_writes(self.out)
            prepare_run_dir(self.out, self.stage, recipe_to_dict(self.recipe))
            (self.out / COMPLETE_MARKER).unlink(missing_ok=True)
            root = logging.getLogger()
            if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == (self.out / LOG_FILE).resolve()
                       for h in root.handlers):
                self.handler = log_file_handler(self.out)
                for record in self.early.buffer:
                    self.handler.handle(record)
                root.addHandler(self.handler)
        logging.getLogger().removeHandler(self.early)
        self.early.buffer.clear()
        self.opened = True
        return self

    def complete(self, artifact: str | Path, **summary: Any) -> StageResult:
        artifact = Path(artifact)
        self.open()
        if self.main:
            mark_complete(self.out, self.stage, artifact, **summary)
        return StageResult(stage=self.stage, out=self.out, artifact=artifact, summary=summary)


def check_writable(out: str | Path) -> None:
    """OUT must be a folder this process can create or write into: refuse before anything is written."""
    import os

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"--out {out} is a file; give a folder path")
    existing = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise RecipeError(f"--out {out}: {existing} is a file, not a folder; give another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(f"--out {out}: {existing} is not writable; give another --out")


RECIPE_HEADER = "# resolved recipe of `longrope"
PARTIAL_WRITE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # outputs.atomic_write_text's temporary files


def clean_partial_writes(out: Path) -> None:
    """Remove the temporary files of atomic writes that a kill interrupted, anywhere in OUT (never read)."""
    if out.is_dir():
        for path in out.rglob(".*.tmp"):
            if PARTIAL_WRITE.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)


def check_own_files(out: Path) -> None:
    """A stage rewrites OUT/recipe.yaml and OUT/env.json: refuse a folder whose files of those names are not ours
    (`--out .` where the user keeps a recipe.yaml)."""
    import json

    recipe = out / "recipe.yaml"
    if recipe.is_file() and not recipe.read_text(encoding="utf-8", errors="replace").startswith(RECIPE_HEADER):
        raise RecipeError(f"--out {out} holds a recipe.yaml that longrope did not write; give another --out (a "
                          "stage folder gets its own resolved recipe.yaml)")
    env = out / "env.json"
    if env.is_file():
        try:
            ours = {"stage", "versions"} <= set(json.loads(env.read_text(encoding="utf-8")))
        except (ValueError, TypeError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise RecipeError(f"--out {out} holds an env.json that longrope did not write; give another --out")


def refuse_overwrite(out: str | Path, stage: str, resume: bool, *markers: str) -> None:
    """A stage that would start afresh over a run of its own (any of `markers` in OUT) needs --resume."""
    found = [m for m in markers if (Path(out) / m).exists()]
    if not resume and found:
        raise RecipeError(f"{out} already holds a {stage} ({found[0]}); pass --resume to continue it, or another "
                          "--out")


def completed_result(stage: str, out: str | Path) -> StageResult:
    """The result a finished stage folder recorded in complete.json (a resume of a complete stage)."""
    import json

    out = Path(out)
    data = json.loads((out / COMPLETE_MARKER).read_text(encoding="utf-8"))
    summary = {k: v for k, v in data.items() if k not in ("stage", "artifact", "finished")}
    return StageResult(stage=stage, out=out, artifact=out / data.get("artifact", "."), summary=summary)


@contextmanager
def stage_folder(stage: str, recipe: Any, out: str | Path) -> Iterator[StageFolder]:
    """The stage's folder, OUT: the stage runs its checks inside this block, then calls `folder.open()`, the first
    write, so that a refused command leaves OUT as it was. From then on OUT/log.txt gets the log (the checks'
    lines included) until the stage returns, and why it stopped if it fails."""
    out = Path(out)
    folder = StageFolder(stage, out, recipe, is_main_process())
    root = logging.getLogger()
    level = root.level
    if folder.main:
        root.addHandler(folder.early)
        root.setLevel(min(level, logging.INFO) if level else logging.INFO)  # the file gets INFO from a library call
    try:
        yield folder
    except BaseException as err:
        # The log file says why the stage stopped; the console already shows it (one line, or a traceback).
        if folder.handler is not None:
            user = isinstance(err, LongRopeError | KeyboardInterrupt)
            text = " ".join(str(err).split()) if isinstance(err, LongRopeError) else type(err).__name__
            folder.handler.handle(log.makeRecord(
                log.name, logging.ERROR, __file__, 0, "%s stopped: %s", (stage, text),
                None if user else (type(err), err, err.__traceback__)))
        raise
    finally:
        root.removeHandler(folder.early)
        folder.early.buffer.clear()
        if folder.handler is not None:
            root.removeHandler(folder.handler)
            folder.handler.close()
        root.setLevel(level)

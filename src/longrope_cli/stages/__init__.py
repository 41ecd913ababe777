"""The stages: one entry point per command, one registry, one owner of the output folder.

Every stage is a function `run(recipe, out_dir, *, resume=False, progress=True, lm=None) -> StageResult`
(`StageResult` or a subclass with more detail, e.g. `SearchResult`). The CLI commands, `longrope run`
and the recipe's `stages:` list all name stages through `STAGES`; `stages.folder.stage_folder` writes what
every stage folder holds (recipe.yaml, env.json, log.txt, then complete.json last).

    >>> from longrope_cli.stages import STAGES
    >>> list(STAGES)
    ['search', 'finetune', 'readjust', 'eval', 'export']
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StageSpec:
    """A stage: its command name, where its entry point lives (imported when used), and what it writes."""

    name: str
    module: str
    function: str
    help: str
    writes_factors: bool  # DIR/factors.json, which later stages (and export) read

    def entry(self) -> Callable[..., Any]:
        return getattr(importlib.import_module(self.module), self.function)


STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("search", "longrope_cli.stages.search", "run_search",
              "Evolutionary search for LongRoPE factors at a target length.", True),
    StageSpec("finetune", "longrope_cli.stages.finetune", "run_finetune",
              "Fine-tune a model with a factor file at the target length.", True),
    StageSpec("readjust", "longrope_cli.stages.readjust", "run_readjust",
              "Search short-context factors on an extended model.", True),
    StageSpec("eval", "longrope_cli.stages.evaluate", "run_eval",
              "Perplexity across lengths and passkey retrieval vs PI / NTK / YaRN.", False),
    StageSpec("export", "longrope_cli.stages.export", "run_export",
              "Write a Hugging Face model directory that plain transformers loads.", False),
)}

__all__ = ["STAGES", "StageSpec"]

"""The LongRoPE evolutionary search: pure evolution, fitness backends, checkpoints, and the runner.

    >>> from longrope_cli.search import run_search            # doctest: +SKIP
    >>> run_search(recipe, Path("runs/search-256k")).factors_path   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "run_search": "longrope_cli.stages.search",
    "SearchResult": "longrope_cli.stages.search",
    "Evaluator": "longrope_cli.search.evaluator",
    "LocalEvaluator": "longrope_cli.search.evaluator",
    "DistributedEvaluator": "longrope_cli.search.evaluator",
    "Fitness": "longrope_cli.search.evaluator",
    "Candidate": "longrope_cli.search.evolution",
    "SearchSpace": "longrope_cli.search.evolution",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'longrope_cli.search' has no attribute {name!r}")

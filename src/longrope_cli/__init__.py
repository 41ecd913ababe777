"""longrope: LongRoPE context-window extension for Hugging Face RoPE models.

The public API (imported lazily, so `import longrope_cli` stays light):

    >>> from longrope_cli import load_model, extend_context            # doctest: +SKIP
    >>> lm = load_model("testbed")                                      # doctest: +SKIP
    >>> result = extend_context(lm, "testbed", 2048, max_evals=40)      # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_model": "longrope_cli.models",
    "LoadedModel": "longrope_cli.models",
    "FactorSet": "longrope_cli.rope.factors",
    "load_factors": "longrope_cli.rope.factors",
    "RopeLayout": "longrope_cli.rope.layout",
    "baseline_factors": "longrope_cli.rope.baselines",
    "install_factors": "longrope_cli.rope.rotary",
    "remove_factors": "longrope_cli.rope.rotary",
    "installed_factors": "longrope_cli.rope.rotary",
    "use_factors": "longrope_cli.api",
    "save_factors": "longrope_cli.api",
    "export": "longrope_cli.api",
    "perplexity": "longrope_cli.api",
    "passkey": "longrope_cli.api",
    "extend_context": "longrope_cli.api",
    "ExtendResult": "longrope_cli.api",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'longrope_cli' has no attribute {name!r}")

"""What `longrope eval` compares: methods (a baseline name, generated per length, or a factor file)."""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longrope_cli.errors import RecipeError
from longrope_cli.rope.baselines import BASELINES, baseline_factors
from longrope_cli.rope.factors import FactorSet, load_factors
from longrope_cli.rope.layout import RopeLayout

FACTOR_SUFFIXES = (".json", ".csv")


@dataclass(frozen=True)
class EvalMethod:
    """One column of the comparison: a baseline generated per length, or the factors of one file."""

    label: str
    kind: str  # "baseline" or "file"
    source: str  # the baseline name, or the factor file path as given
    factors: FactorSet | None = None  # the loaded file (kind == "file")
    native: FactorSet | None = None  # a pre-scaled model's own factors: baselines go on top of them

    def factors_at(self, layout: RopeLayout, length: int) -> FactorSet:
        """The factor set scored at `length` (baselines are regenerated for each length; on a pre-scaled model
        `none` is the model as shipped and the others extend it relative to its shipped window)."""
        if self.factors is not None:
            return self.factors
        return baseline_factors(self.source, layout, length, native=self.native)


def file_label(path: Path) -> str:
    """A readable name for a factor file: its folder for `.../NAME/factors.json`, else its stem."""
    if path.name == "factors.json" and path.parent.name not in ("", "."):
        return path.parent.name
    if path.is_dir():
        return path.name
    return path.stem


def check_method_names(names: list[str]) -> list[tuple[str, str]]:
    """(kind, name) per method, checked without a model: a typo or a missing file fails before any loading."""
    if not names:
        raise RecipeError("eval.methods is empty; pass e.g. --methods none,pi,ntk,yarn,runs/search-2k/factors.json")
    checked = []
    for raw in names:
        name = str(raw).strip()
        baseline = name.lower().replace("_", "-")
        if baseline in BASELINES:
            checked.append(("baseline", baseline))
            continue
        path = Path(name).expanduser()
        if not (path.exists() or "/" in name or name.lower().endswith(FACTOR_SUFFIXES)):
            close = difflib.get_close_matches(baseline, list(BASELINES), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RecipeError(f"unknown method {name!r}: {hint}use {', '.join(BASELINES)} or a factor file "
                              "(.json / .csv)")
        load_factors(path)  # one-line FactorFileError if missing or unreadable
        checked.append(("file", name))
    return checked


def resolve_methods(names: list[str], layout: RopeLayout) -> list[EvalMethod]:
    """Baseline names and factor files -> methods with unique labels; every mistake is a one-line error."""
    methods: list[EvalMethod] = []
    for kind, name in check_method_names(names):
        if kind == "baseline":
            methods.append(EvalMethod(label=name, kind="baseline", source=name))
            continue
        path = Path(name).expanduser()
        factors = load_factors(path, layout)  # refuses factors made for another model, in one line
        methods.append(EvalMethod(label=file_label(path), kind="file", source=name, factors=factors))
    seen: dict[str, int] = {}
    unique = []
    for method in methods:
        count = seen.get(method.label, 0)
        seen[method.label] = count + 1
        if method.kind == "baseline" and count:
            raise RecipeError(f"eval.methods lists {method.label!r} twice; give each method once")
        unique.append(method if not count else dataclasses.replace(method, label=f"{method.label}-{count + 1}"))
    return unique


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "method"


def factor_summary(factors: FactorSet) -> dict[str, Any]:
    return {
        "method": factors.method,
        "long_factor": list(factors.long_factor),
        "short_factor": list(factors.short_factor) if factors.short_factor is not None else None,
        "start_tokens": factors.start_tokens,
        "attention": factors.attention,
        "target_length": factors.target_length,
    }


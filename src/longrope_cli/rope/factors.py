"""`FactorSet`: per-pair rescale factors, start tokens and attention scale, with the JSON factor file.

A factor set fully describes a positional interpolation of RoPE: angle(n, i) = n * theta_i / lambda_i
for positions n >= start_tokens (n-hat), n * theta_i below it; cos and sin are multiplied by the
attention factor. Every method (none, PI, NTK, YaRN, LongRoPE) is one of these, so one rotary module
serves them all. With `short_factor` set, the short factors apply while the sequence fits in the
original window and the long ones beyond it, exactly as transformers' `rope_type: longrope` does.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from longrope_cli.errors import FactorFileError
from longrope_cli.lengths import format_length
from longrope_cli.outputs import atomic_write_json
from longrope_cli.rope.layout import RopeLayout

FORMAT_NAME = "longrope-factors"
FORMAT_VERSION = 1
ATTENTION_POLICIES = ("su", "yarn", "none")
LONGROPE_TYPES = (None, "longrope", "su")  # rope_type values whose missing attention_factor means su

log = logging.getLogger(__name__)


def attention_factor(policy: str, scale: float, original_length: int) -> float:
    """The cos/sin multiplier for a policy: su = sqrt(1 + ln s / ln L), yarn = 0.1 ln s + 1, none = 1, or a number."""
    if policy == "none" or scale <= 1.0:
        return 1.0 if policy in ATTENTION_POLICIES else _fixed_policy(policy)
    if policy == "su":
        return math.sqrt(1.0 + math.log(scale) / math.log(original_length))
    if policy == "yarn":
        return 0.1 * math.log(scale) + 1.0
    return _fixed_policy(policy)


def _fixed_policy(policy: str) -> float:
    try:
        value = float(policy)
    except ValueError:
        raise FactorFileError(
            f"attention scale {policy!r} is unknown; use su, yarn, none or a positive number") from None
    if not math.isfinite(value) or value <= 0:
        raise FactorFileError(f"attention scale {policy!r} must be a positive number")
    return value


@dataclass(frozen=True)
class FactorSet:
    """One positional interpolation: lambda_i per frequency pair (high to low frequency), n-hat, attention scale.

    Example:
        >>> fs = FactorSet(long_factor=(1.0, 1.5, 2.0, 2.0), start_tokens=4, attention=1.1)
        >>> fs.pairs
        4
    """

    long_factor: tuple[float, ...]
    start_tokens: int = 0
    attention: float = 1.0
    attention_policy: str = "none"
    short_factor: tuple[float, ...] | None = None
    target_length: int | None = None
    method: str = "longrope"
    provenance: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "long_factor", tuple(float(x) for x in self.long_factor))
        if self.short_factor is not None:
            object.__setattr__(self, "short_factor", tuple(float(x) for x in self.short_factor))

    @property
    def pairs(self) -> int:
        return len(self.long_factor)

    def with_provenance(self, **info: Any) -> FactorSet:
        return replace(self, provenance={**self.provenance, **info})

    def check(self, layout: RopeLayout, *, paper_constraints: bool = False, source: str = "factor set") -> FactorSet:
        """Refuse factors that do not fit `layout` (count, finite, positive); optionally the paper's constraints."""
        for name, values in (("long_factor", self.long_factor), ("short_factor", self.short_factor)):
            if values is None:
                continue
            if len(values) != layout.pairs:
                raise FactorFileError(
                    f"{source}: {name} has {len(values)} values but model {layout.name!r} has {layout.pairs} "
                    f"frequency pairs (rotary dim {layout.rotary_dim}); it was made for another model")
            bad = [i for i, v in enumerate(values) if not math.isfinite(v) or v <= 0]
            if bad:
                raise FactorFileError(f"{source}: {name}[{bad[0]}] = {values[bad[0]]} is not a finite positive number")
            if paper_constraints and (why := paper_violation(values, name)):
                raise FactorFileError(f"{source}: {why}")
        if self.start_tokens < 0:
            raise FactorFileError(f"{source}: start_tokens (n-hat) must be >= 0, got {self.start_tokens}")
        if not math.isfinite(self.attention) or self.attention <= 0:
            raise FactorFileError(f"{source}: attention factor must be a positive number, got {self.attention}")
        return self

    def warn_outside_paper(self, source: str) -> FactorSet:
        """Log (once per source) when the factors leave the paper's space: lambda_i >= 1, non-decreasing from high
        to low frequency (section 3.2). They are used as given: a research file may do so on purpose."""
        for name, values in (("long_factor", self.long_factor), ("short_factor", self.short_factor)):
            why = paper_violation(values, name) if values is not None else None
            if why and (source, name) not in _WARNED:
                _WARNED.add((source, name))
                log.warning("%s: %s; using it as given", source, why)
        return self

    # ------------------------------------------------------------------ file format

    def to_dict(self, layout: RopeLayout) -> dict[str, Any]:
        """The versioned JSON document (see README, "Factor file format")."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "method": self.method,
            "model": layout.to_dict(),
            "target_length": self.target_length,
            "scale": layout.scale(self.target_length) if self.target_length else None,
            "long_factor": list(self.long_factor),
            "start_tokens": self.start_tokens,
            "attention": {"policy": self.attention_policy, "factor": self.attention},
            "short_factor": list(self.short_factor) if self.short_factor is not None else None,
            "provenance": self.provenance,
        }

    def save(self, path: str | Path, layout: RopeLayout) -> Path:
        """Write the factor file atomically (a crash never leaves a half-written file)."""
        self.check(layout, source=str(path))
        atomic_write_json(path, self.to_dict(layout))
        return Path(path)


_WARNED: set[tuple[str, str]] = set()


def paper_violation(values: tuple[float, ...], name: str = "lambda") -> str | None:
    """Why `values` leave the paper's search space (lambda_i >= 1, non-decreasing), or None."""
    if min(values) < 1.0:
        i = min(range(len(values)), key=values.__getitem__)
        return f"{name}[{i}] = {values[i]} < 1 (the paper requires lambda_i >= 1)"
    drops = [i for i in range(1, len(values)) if values[i] < values[i - 1]]
    if drops:
        i = drops[0]
        return (f"{name} decreases at pair {i} ({values[i - 1]} -> {values[i]}); the paper requires lambda_i "
                "non-decreasing from high to low frequency")
    return None


def _as_floats(values: Any, key: str, source: str) -> tuple[float, ...]:
    if not isinstance(values, list) or not values:
        raise FactorFileError(f"{source}: {key} must be a non-empty list of numbers")
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise FactorFileError(f"{source}: {key} must contain only numbers") from None


def _read_csv(path: Path, layout: RopeLayout | None = None) -> FactorSet:
    """The official search's `result_final.csv`: d/2 floats, one per line (commas also accepted).

    The `dim_mono_n` variant has d/2 + 1 values, the first being n-hat (start tokens, an integer); it
    can only be told apart with `layout` (exactly `layout.pairs + 1` values, the first a whole number >= 0).
    """
    values = []
    for line in path.read_text(encoding="utf-8").splitlines():
        for cell in line.replace(";", ",").split(","):
            cell = cell.strip()
            if not cell:
                continue
            try:
                values.append(float(cell))
            except ValueError:
                if values:  # a header is fine, text after numbers is not
                    raise FactorFileError(f"{path}: {cell!r} is not a number; expected one factor per line") from None
    if not values:
        raise FactorFileError(f"{path}: no factors found; expected one number per line")
    start_tokens, variant = 0, "dim_mono"
    first = values[0]
    if (layout is not None and len(values) == layout.pairs + 1 and math.isfinite(first)
            and first >= 0 and first == int(first)):
        start_tokens, values, variant = int(first), values[1:], "dim_mono_n"
    return FactorSet(long_factor=tuple(values), start_tokens=start_tokens, method="longrope-csv",
                     provenance={"source": str(path), "csv_variant": variant})


def _csv_attention(factors: FactorSet, layout: RopeLayout | None, target_length: int | None,
                   source: str) -> FactorSet:
    """A CSV holds no target or attention factor: su from the caller's target (the official default policy)."""
    if target_length is None or layout is None:
        missing = ("no target length was given (pass a target, e.g. --target)" if target_length is None
                   else "no model layout was given (the original window is unknown)")
        log.warning("%s: attention factor could not be derived as su = sqrt(1 + ln s / ln L_orig): %s; "
                    "using 1.0", source, missing)
        return replace(factors, target_length=target_length)
    value = attention_factor("su", layout.scale(target_length), layout.original_length)
    log.info("%s: attention factor derived as su = %.6f (s = %s / %s, the official default policy)",
             source, value, format_length(target_length), format_length(layout.original_length))
    return replace(factors, attention=value, attention_policy="su", target_length=target_length)


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        return None
    return int(value)


def _from_config(top: dict[str, Any], rope: dict[str, Any], source: str,
                 layout: RopeLayout | None) -> tuple[FactorSet, dict[str, Any]]:
    """An exported / Phi-3-style config.json, read as transformers' `_compute_longrope_parameters` does.

    original = `original_max_position_embeddings` (top level first, then the rope dict); target =
    `max_position_embeddings`, else `factor` x original; a missing `attention_factor` is su of s =
    `factor` if given, else max_position_embeddings / original (1.0 when s <= 1).
    """
    factors, _ = _from_mapping(rope, source)
    original = (_positive_int(top.get("original_max_position_embeddings"))
                or _positive_int(rope.get("original_max_position_embeddings")))
    model = {"original_length": original} if original else {}
    if original is None:  # transformers falls back to max_position_embeddings (so s = 1)
        original = _positive_int(top.get("max_position_embeddings")) or (layout.original_length if layout else None)
    factor = rope.get("factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, int | float)
                               or not math.isfinite(factor) or factor <= 0):
        raise FactorFileError(f"{source}: rope factor must be a positive number, got {factor!r}")
    target = _positive_int(top.get("max_position_embeddings"))
    if target is None and factor is not None and original:
        target = round(factor * original)
    factors = replace(factors, target_length=target)
    if rope.get("attention_factor") is not None:
        return factors, model
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in LONGROPE_TYPES:
        return factors, model
    scale = float(factor) if factor is not None else (target / original if target and original else None)
    if scale is None or not original:
        log.warning("%s: no attention_factor and no max_position_embeddings / factor / "
                    "original_max_position_embeddings to derive it from; using 1.0", source)
        return factors, model
    value = attention_factor("su", scale, original)
    log.info("%s: no attention_factor; derived as su = %.6f (s = %g, original %s), as transformers does",
             source, value, scale, format_length(original))
    return replace(factors, attention=value, attention_policy="su"), model


def _from_mapping(data: dict[str, Any], source: str,
                  layout: RopeLayout | None = None) -> tuple[FactorSet, dict[str, Any]]:
    if "rope_parameters" in data or "rope_scaling" in data:  # an exported config.json
        rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise FactorFileError(f"{source}: rope_scaling / rope_parameters must be a JSON object")
        return _from_config(data, rope, source, layout)
    if "long_factor" not in data:
        raise FactorFileError(f"{source}: no 'long_factor' list; is this a longrope factor file?")
    if data.get("format") not in (None, FORMAT_NAME):
        raise FactorFileError(f"{source}: format {data.get('format')!r} is not {FORMAT_NAME!r}")
    version = data.get("version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FactorFileError(f"{source}: format version {version!r} is newer than this longrope understands; upgrade")
    attention = data.get("attention") or {}
    if not isinstance(attention, dict):
        attention = {"policy": "fixed", "factor": attention}
    if "attention_factor" in data and not attention:
        attention = {"policy": "fixed", "factor": data["attention_factor"]}
    short = data.get("short_factor")
    start_tokens = data.get("start_tokens", 0)
    if not isinstance(start_tokens, int) or isinstance(start_tokens, bool):
        raise FactorFileError(f"{source}: start_tokens must be an integer, got {start_tokens!r}")
    try:
        factor = float(attention.get("factor", 1.0))
    except (TypeError, ValueError):
        raise FactorFileError(f"{source}: attention.factor must be a number") from None
    target = data.get("target_length")
    if target is not None and (not isinstance(target, int) or isinstance(target, bool) or target < 1):
        raise FactorFileError(f"{source}: target_length must be a positive integer number of tokens (e.g. 262144), "
                              f"got {target!r}")
    for key in ("provenance", "model"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise FactorFileError(f"{source}: {key} must be a JSON object, got {type(data[key]).__name__}")
    model = dict(data.get("model") or {})
    for key in ("rotary_dim", "rope_theta", "original_length"):
        value = model.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise FactorFileError(f"{source}: model.{key} must be a number, got {value!r}")
    factors = FactorSet(
        long_factor=_as_floats(data["long_factor"], "long_factor", source),
        start_tokens=start_tokens,
        attention=factor,
        attention_policy=str(attention.get("policy", "none")),
        short_factor=_as_floats(short, "short_factor", source) if short is not None else None,
        target_length=target,
        method=str(data.get("method", "longrope")),
        provenance=dict(data.get("provenance") or {}),
    )
    return factors, model


def load_factors(path: str | Path, layout: RopeLayout | None = None, target_length: int | None = None) -> FactorSet:
    """Read a factor file (our JSON, an exported config.json, or the official `result_final.csv`) and check it.

    With `layout`, the file must match the model (pair count, rope_theta, original window); with
    `target_length`, it must have been made for that target. Every mismatch is a one-line error.
    A CSV has no target inside: `target_length` becomes its target, and with `layout` its attention
    factor is su(target / original), the official search's default (without one it stays 1.0, with a
    warning). A config.json without `attention_factor` gets su, as transformers derives it.
    """
    path = Path(path)
    source = str(path)
    if path.is_dir() and (path / "factors.json").is_file():
        path = path / "factors.json"
        source = str(path)
    if path.is_dir():
        raise FactorFileError(f"{source} is a folder without a factors.json; pass a factor file or a stage folder "
                              "that holds one")
    if not path.is_file():
        raise FactorFileError(f"factor file {source!r} not found; pass the factors.json written by a previous stage")
    if path.suffix.lower() == ".csv":
        factors, model = _csv_attention(_read_csv(path, layout), layout, target_length, source), {}
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise FactorFileError(f"{source}: not valid JSON ({err.msg if hasattr(err, 'msg') else err})") from None
        except RecursionError:
            raise FactorFileError(f"{source}: nested too deeply to be a factor file") from None
        except OSError as err:
            raise FactorFileError(f"{source}: cannot be read ({err.strerror or err})") from None
        if not isinstance(data, dict):
            raise FactorFileError(f"{source}: expected a JSON object with 'long_factor'")
        factors, model = _from_mapping(data, source, layout)
    if layout is not None:
        _check_model(model, layout, source)
        factors.check(layout, source=source).warn_outside_paper(source)
    if target_length is not None and factors.target_length not in (None, target_length):
        raise FactorFileError(
            f"{source}: made for target {format_length(factors.target_length)}, this stage targets "
            f"{format_length(target_length)}; pass --target {format_length(factors.target_length)} or search again")
    return factors.with_provenance(loaded_from=source) if "loaded_from" not in factors.provenance else factors


def _check_model(model: dict[str, Any], layout: RopeLayout, source: str) -> None:
    checks = (
        ("rotary_dim", layout.rotary_dim),
        ("rope_theta", layout.rope_theta),
        ("original_length", layout.original_length),
    )
    for key, expected in checks:
        if key in model and model[key] is not None and float(model[key]) != float(expected):
            raise FactorFileError(
                f"{source}: made for a model with {key}={model[key]} ({model.get('name', '?')}), but "
                f"{layout.name!r} has {key}={expected}; use factors searched on this model")

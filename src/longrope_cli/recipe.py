"""The recipe: one typed, strict configuration shared by every stage.

Precedence, everywhere: dataclass defaults < recipe YAML < `key=value` overrides < explicit CLI flags.
Unknown keys and wrong types are refused with a one-line error that names the key (and suggests the
closest valid one). Lengths accept 4096, 4k, 256k, 2048k, 2m.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from longrope_cli.errors import RecipeError
from longrope_cli.lengths import format_length, parse_length

PAPER_START_TOKENS = [0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256]


def _field(default: Any, doc: str, kind: str | None = None) -> Any:
    """A dataclass field with a help text (shown by `longrope recipe fields`) and an optional parse kind."""
    metadata = {"doc": doc, "kind": kind}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    name: str = _field("testbed", "local Hugging Face directory, a .gguf file, or 'testbed' (the bundled CPU model)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _field(
        "auto", "weights dtype; auto = bfloat16 on GPU, float32 on CPU")
    device: str = _field("auto", "auto, cpu, cuda, cuda:1, ...")
    attn_implementation: str = _field("sdpa", "sdpa keeps attention memory linear in length; eager needs L^2")
    original_length: int | None = _field(None, "override the model's original context window", "length")
    loss_chunk: int = _field(1024, "tokens per logits chunk: loss never materialises an L x vocab tensor")
    scoring: Literal["auto", "layerwise", "standard"] = _field(
        "auto", "scoring forward: layerwise (per-token work over chunks, attention one kv head at a time: weights + "
                "a few L x hidden tensors), standard (the model's forward, MLPs chunked), auto (layerwise from 32k "
                "tokens where the architecture allows)")
    trust_remote_code: bool = _field(False, "passed to transformers for models with custom code")


@dataclass
class DataConfig:
    corpus: str = _field("testbed", "txt/txt.gz file or folder, .jsonl, .parquet, save_to_disk folder, .npy/.bin "
                                    "tokens, or 'testbed' (bundled Austen + Melville corpus)")
    text_field: str = _field("text", "field holding the text in jsonl / parquet / datasets corpora")
    search_fraction: float = _field(0.1, "share of documents for the search split (corpora without split folders)")
    eval_fraction: float = _field(0.1, "share of documents for the eval split (corpora without split folders)")
    windows_per_doc: int = _field(0, "windows cut from one document; 0 = as many as fit, taken round-robin "
                                     "across documents (1 = the paper: first L tokens of each document)")
    cache_dir: str | None = _field(None, "token cache folder; default ~/.cache/longrope")


@dataclass
class SearchConfig:
    target: int | None = _field(None, "target context length (e.g. 256k); required", "length")
    population: int | None = _field(None, "population size; null = the paper's 64 (32 above 512k)")
    iterations: int = _field(40, "generations after the initial population")
    mutations: int | None = _field(None, "mutated children per generation; null = 16 (8 above 512k)")
    crossovers: int | None = _field(None, "crossover children per generation; null = 16 (8 above 512k)")
    mutation_prob: float = _field(0.3, "probability that a factor (or n-hat) is mutated")
    survivors: int = _field(32, "parents kept per generation (the best ones)")
    factor_step: float = _field(0.01, "grid step of lambda_i")
    factor_min: float = _field(1.0, "lower bound of lambda_i")
    factor_max_ratio: float = _field(1.25, "upper bound of lambda_i as a multiple of s = target / original")
    start_tokens: int | None = _field(None, "fix n-hat (0 = loads in plain transformers); null = search it")
    start_token_choices: list[int] = _field(list(PAPER_START_TOKENS), "n-hat values the search may pick")
    documents: int | None = _field(None, "search-split windows scored per candidate; null = the paper's 5 (3 "
                                         "above 512k)")
    attention: str = _field("su", "attention scale: su, yarn, none, a number, or base (keep base_factors' value)")
    base_factors: str | None = _field(None, "progressive search: factor file of the fine-tuned model; the search "
                                            "is relative to it (absolute = relative x base)")
    seed_factors: list[str] = _field([], "extra factor files added to the initial population")
    seed: int = _field(0, "random seed (the search is deterministic for a seed)")
    racing: bool = _field(False, "stop scoring a candidate once its NLL so far already exceeds the worst "
                                 "survivor's total: it provably cannot survive (same result, fewer forwards)")
    race_margin: float = _field(0.0, "racing: stop only when the NLL so far exceeds that total by this fraction "
                                     "more (>= 0; more conservative)")
    fitness: Literal["perplexity", "needle"] = _field(
        "perplexity", "perplexity: every token of the windows (the paper); needle: only the answer to a 7-digit "
                      "number planted at a stratified depth of each window (LongRoPE2)")
    critical_dim: str = _field("off", "LongRoPE2's critical dimension: off; auto (the first pair whose period "
                                      "exceeds the original window); a pair index; or search (try auto - 4 .. "
                                      "auto + 4 and off by their best seed first). From it on lambda_i is searched "
                                      "in [s, 1.25 s], below it lambda_i = lambda_cd^(i / cd) (NTK-like)")
    validate_top: int = _field(0, "re-rank the best N candidates on fresh search-split windows that the evolution "
                                  "never scored, and hand on the best there (0: off)")
    validate_documents: int | None = _field(None, "fresh windows for validate_top; null = search.documents")
    attention_search: bool = _field(True, "after the factors, search the attention factor (temperature) with the "
                                          "factors frozen (LongRoPE2's second stage); skipped with attention=base")
    attention_search_evals: int = _field(12, "evaluations of the attention search (golden-section on [1, 1.5 su])")
    max_evals: int | None = _field(None, "stop after this many fitness evaluations")
    max_minutes: float | None = _field(None, "stop after this many minutes of wall time")
    patience: int | None = _field(None, "stop after this many generations without improvement")
    backend: Literal["local", "distributed"] = _field("local", "local: one process; distributed: torchrun/srun ranks")


@dataclass
class FinetuneConfig:
    target: int | None = _field(None, "training sequence length (default: the factor file's target)", "length")
    factors: str | None = _field(None, "factor file installed during training (from `longrope search`)")
    steps: int = _field(400, "optimizer steps")
    lr: float = _field(2e-5, "peak learning rate")
    schedule: Literal["linear", "constant", "cosine"] = _field("linear", "decay after warm-up")
    warmup_steps: int = _field(20, "linear warm-up steps")
    batch_size: int = _field(32, "global batch size in sequences")
    micro_batch_size: int = _field(1, "sequences per forward on one device (the rest is accumulation)")
    short_batch_size: int = _field(0, "extra windows of the original length per step, trained with the short "
                                      "factors (1.0 unless the file has some) and the same attention factor, "
                                      "so short inputs keep their quality; 0 = the paper (long windows only)")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    grad_clip: float = _field(1.0, "max gradient norm; 0 disables")
    precision: Literal["auto", "fp32", "bf16"] = _field("auto", "auto = bf16 on GPU, fp32 on CPU")
    activation_checkpointing: bool = _field(True, "recompute layer activations in backward (memory for time)")
    mlp_chunk: int | None = _field(None, "positions per MLP slice, each recomputed on its own in backward (the "
                                         "largest activation at long lengths); 0 = whole sequence; null = "
                                         "model.loss_chunk from 32k tokens on, else 0")
    activation_offload: bool = _field(False, "keep the checkpointed layer inputs in CPU memory (frees layers x "
                                             "length x hidden x 2 bytes per GPU; transformers >= 5.24)")
    save_every: int = _field(50, "checkpoint every N steps (0: only on SIGTERM)")
    seed: int = _field(0, "random seed")
    keep_checkpoint: bool = _field(False, "keep DIR/checkpoint (weights + AdamW states, ~16 bytes/parameter) "
                                          "after the final model is saved")


@dataclass
class ReadjustConfig:
    factors: str | None = _field(None, "factor file of the extended model; its long factors are kept")
    lengths: list[int] = _field([4096, 8192], "short lengths scored (within the original window)", "lengths")
    factor_max: float = _field(1.25, "ceiling for short factors (lower than the long search's)")
    factor_min: float = _field(1.0, "lower bound of the short factors")
    factor_step: float = _field(0.01, "grid step of the short factors")
    mutation_prob: float = _field(0.3, "probability that a factor is mutated")
    population: int = _field(32, "population size")
    iterations: int = _field(20, "generations")
    documents: int = _field(5, "search-split documents per length")
    seed: int = _field(0, "random seed")
    max_evals: int | None = _field(None, "stop after this many fitness evaluations")
    max_minutes: float | None = _field(None, "stop after this many minutes of wall time")
    patience: int | None = _field(None, "stop after this many generations without improvement")
    backend: Literal["local", "distributed"] = _field("local", "local: one process; distributed: torchrun/srun ranks")


@dataclass
class EvalConfig:
    lengths: list[int] = _field([4096, 8192, 16384, 32768, 65536, 131072, 262144], "perplexity lengths", "lengths")
    methods: list[str] = _field(["none", "pi", "ntk", "dynamic-ntk", "yarn"],
                                "baselines (none, pi, ntk, dynamic-ntk, yarn) and factor files")
    documents: int = _field(5, "eval-split documents per length")
    mode: Literal["truncate", "same-text", "sliding"] = _field(
        "truncate", "truncate: one window per document (the paper); same-text: windows of the longest length cut "
                    "into shorter ones, so every length scores the same tokens; sliding: a sliding window")
    stride: int | None = _field(None, "sliding-window stride (default: half the length; at most length - 1)",
                                "length")
    sliding_tokens: int | None = _field(None, "sliding mode: tokens of each document the window slides over "
                                              "(default: 4 x the length)", "length")
    passkey_lengths: list[int] = _field([], "passkey lengths (empty: no passkey test)", "lengths")
    passkey_depths: list[float] = _field([0.0, 0.25, 0.5, 0.75, 1.0], "relative depths of the key")
    passkey_trials: int = _field(10, "trials per (length, depth)")
    plots: bool = _field(True, "write PNG plots")
    seed: int = _field(0, "random seed (passkeys)")


@dataclass
class ExportConfig:
    factors: str | None = _field(None, "factor file (or stage folder) to export: long factors, and short ones if "
                                       "it has them; under `longrope run` default: the last earlier stage's")
    short_factors: str | None = _field(None, "factor file whose factors become short_factor (e.g. from readjust)")
    target: int | None = _field(None, "max_position_embeddings of the export (default: the factor file's target)",
                                "length")


@dataclass
class ParallelConfig:
    dist_backend: Literal["auto", "gloo", "nccl"] = _field("auto", "torch.distributed backend; auto = nccl on GPU")
    fsdp: bool = _field(False, "shard the model with FSDP when fine-tuning on several ranks")
    context_parallel: int = _field(1, "ranks that share one sequence (torch's ring attention): fine-tuning (CUDA) "
                                          "and search scoring (CPU or CUDA); 1 = off")


@dataclass
class OutputConfig:
    dir: str | None = _field(None, "stage output folder (default runs/<stage>-<target>)")
    resume: bool = _field(False, "continue an interrupted run from its checkpoint in `dir`")


@dataclass
class StageConfig:
    name: str = _field("", "stage name; later stages refer to its output as ${name}")
    command: str = _field("search", "which stage to run: search, finetune, readjust, eval or export")
    overrides: dict[str, Any] = _field({}, "dotted recipe keys set for this stage only")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    readjust: ReadjustConfig = field(default_factory=ReadjustConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    stages: list[StageConfig] = field(default_factory=list, metadata={
        "doc": "pipeline stages run in order by `longrope run` (name, command, overrides)"})


# --------------------------------------------------------------------------- ranges
# Checked when a recipe is built (before any model loads), so `longrope recipe validate` sees them too.
# Checks that need the model (a target beyond its window, lengths within it) stay with the stage.


def _at_least(n: float) -> tuple[Any, str]:
    return (lambda v: v >= n), f">= {n:g}"


def _above(n: float) -> tuple[Any, str]:
    return (lambda v: math.isfinite(v) and v > n), f"a finite number > {n:g}"


_FRACTION = ((lambda v: 0.0 <= v <= 1.0), "in [0, 1]")
_OPEN_FRACTION = ((lambda v: 0.0 < v < 1.0), "in (0, 1)")

RANGES: dict[str, tuple[Any, str]] = {
    "model.loss_chunk": _at_least(1),
    "data.search_fraction": _OPEN_FRACTION, "data.eval_fraction": _OPEN_FRACTION,
    "data.windows_per_doc": _at_least(0),
    "search.population": _at_least(2), "search.iterations": _at_least(0), "search.mutations": _at_least(0),
    "search.crossovers": _at_least(0), "search.survivors": _at_least(1), "search.mutation_prob": _FRACTION,
    "search.factor_step": _above(0), "search.factor_min": _above(0), "search.factor_max_ratio": _above(0),
    "search.start_tokens": _at_least(0), "search.documents": _at_least(1), "search.race_margin": _at_least(0),
    "search.validate_top": _at_least(0), "search.validate_documents": _at_least(1),
    "search.attention_search_evals": _at_least(2), "search.max_evals": _at_least(1),
    "search.max_minutes": _above(0), "search.patience": _at_least(1),
    "finetune.steps": _at_least(1), "finetune.lr": _above(0), "finetune.warmup_steps": _at_least(0),
    "finetune.batch_size": _at_least(1), "finetune.micro_batch_size": _at_least(1),
    "finetune.short_batch_size": _at_least(0), "finetune.weight_decay": _at_least(0),
    "finetune.grad_clip": _at_least(0), "finetune.save_every": _at_least(0), "finetune.mlp_chunk": _at_least(0),
    "readjust.factor_max": _above(0), "readjust.factor_min": _above(0), "readjust.factor_step": _above(0),
    "readjust.mutation_prob": _FRACTION, "readjust.population": _at_least(2), "readjust.iterations": _at_least(0),
    "readjust.documents": _at_least(1), "readjust.max_evals": _at_least(1), "readjust.max_minutes": _above(0),
    "readjust.patience": _at_least(1),
    "eval.documents": _at_least(1), "eval.stride": _at_least(1), "eval.sliding_tokens": _at_least(2),
    "eval.passkey_trials": _at_least(1),
    "parallel.context_parallel": _at_least(1),
}
# Lists whose every item must satisfy a check, and lists that must not be empty.
ITEM_RANGES: dict[str, tuple[Any, str]] = {
    "search.start_token_choices": _at_least(0), "readjust.lengths": _at_least(2), "eval.lengths": _at_least(2),
    "eval.passkey_lengths": _at_least(2), "eval.passkey_depths": _FRACTION,
}
NOT_EMPTY = ("search.start_token_choices", "readjust.lengths", "eval.lengths", "eval.methods")


def _check_choice(key: str, value: Any, words: tuple[str, ...], number: str, integer: bool = False) -> None:
    """A value that is one of `words` or a number (> 0, or an integer >= 0)."""
    text = str(value).strip().lower()
    if text in words:
        return
    try:
        number_value = int(text) if integer else float(text)
    except ValueError:
        number_value = None
    if number_value is None or not math.isfinite(number_value) or number_value < 0 or (not integer
                                                                                       and number_value == 0):
        raise RecipeError(f"{key}={value!r}: use {', '.join(words)} or {number}")


def check_ranges(recipe: Recipe) -> Recipe:
    """Every value in range, or a one-line RecipeError naming the key, the value and what it must be."""
    def value_of(key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(recipe, section), name)

    for key, (ok, requirement) in RANGES.items():
        value = value_of(key)
        if value is not None and not ok(value):
            raise RecipeError(f"{key}={value!r} is out of range: it must be {requirement}")
    for key, (ok, requirement) in ITEM_RANGES.items():
        bad = [v for v in value_of(key) if not ok(v)]
        if bad:
            raise RecipeError(f"{key} holds {bad[0]!r}: every item must be {requirement}")
    for key in NOT_EMPTY:
        if not value_of(key):
            raise RecipeError(f"{key} is empty; give at least one value (see `longrope recipe fields`)")
    if recipe.data.search_fraction + recipe.data.eval_fraction >= 1.0:
        raise RecipeError("data.search_fraction + data.eval_fraction must be below 1 (the rest is the train split)")
    _check_choice("search.attention", recipe.search.attention, ("su", "yarn", "none", "base"), "a positive number")
    _check_choice("search.critical_dim", recipe.search.critical_dim, ("off", "none", "false", "auto", "search"),
                  "a pair index >= 0", integer=True)
    from longrope_cli.stages import STAGES  # the one list of stage names

    for k, stage in enumerate(recipe.stages):
        if stage.command not in STAGES:
            close = difflib.get_close_matches(stage.command, list(STAGES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"stages[{k}].command={stage.command!r} is not a stage{hint}; use "
                              f"{', '.join(STAGES)}")
    return recipe


# --------------------------------------------------------------------------- coercion


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str, kind: str | None = None) -> Any:
    """Check (and gently convert) `value` against the type `hint`; raise a one-line RecipeError if it does not fit."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, kind)
            except RecipeError as err:
                errors.append(err)
        raise errors[0]
    if kind == "length" and hint is int:
        return parse_length(value, key)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint_text = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}{hint_text}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str) and (kind == "lengths" or item in (int, float, str)):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{key}: expected a list ({_type_name(hint)}), got {value!r}")
        item_kind = "length" if kind == "lengths" else None
        return [_coerce(v, item, f"{key}[{i}]", item_kind) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping of {hint.__name__} keys, got {value!r}")
        return _build(hint, value, key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise RecipeError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise RecipeError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{key}: expected a string, got {value!r}")
    if hint is Any:
        return value
    raise RecipeError(f"{key}: unsupported type {hint!r}")  # pragma: no cover - schema bug


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(cls: type, key: str, prefix: str) -> RecipeError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    where = f"{prefix}.{key}" if prefix else key
    suggestion = f"did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else (
        f"valid keys: {', '.join(names)}")
    return RecipeError(f"unknown recipe key {where!r}: {suggestion}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(cls, str(key), prefix)
        name = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], name, fields[key].metadata.get("kind"))
    return cls(**kwargs)


# --------------------------------------------------------------------------- public API


def parse_override(text: str) -> tuple[str, Any]:
    """`search.population=32` -> ("search.population", 32); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not key=value; write e.g. search.population=32")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise RecipeError(f"override {text!r} has no key; write e.g. search.population=32")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML into a plain mapping (no validation yet)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} not found; pass a YAML file such as recipes/tiny.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {str(path)!r} is not UTF-8 text; save it as UTF-8 and retry") from None
    except OSError as err:
        raise RecipeError(f"recipe {str(path)!r} cannot be read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML{where}; fix the syntax and retry") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {str(path)!r} must be a mapping of sections (model:, search:, ...)")
    return data


def build_recipe(
    data: dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, Any] | None = None,
) -> Recipe:
    """Merge a recipe mapping, `key=value` overrides and explicit flags (in that precedence) and validate."""
    merged: dict[str, Any] = _deep_copy(data or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(merged, key, value)
    for key, value in (flags or {}).items():
        if value is not None:
            _set_dotted(merged, key, value)
    for section, value in merged.items():
        if value is None:
            merged[section] = {}
    return check_ranges(_build(Recipe, merged))


def load_recipe(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, Any] | None = None,
) -> Recipe:
    """Defaults < recipe file < overrides < flags, validated."""
    return build_recipe(read_recipe_file(path) if path else {}, overrides, flags)


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def recipe_to_dict(obj: Any) -> Any:
    """A YAML-ready mapping of a recipe (lengths written as 4k / 256k where exact)."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            kind = f.metadata.get("kind")
            if kind == "length" and isinstance(value, int):
                out[f.name] = format_length(value)
            elif kind == "lengths" and isinstance(value, list):
                out[f.name] = [format_length(v) for v in value]
            else:
                out[f.name] = recipe_to_dict(value)
        return out
    if isinstance(obj, list):
        return [recipe_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: recipe_to_dict(v) for k, v in obj.items()}
    return obj


def field_docs(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every recipe key, for `longrope recipe fields`."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(field_docs(hint, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        if f.metadata.get("kind") == "length" and isinstance(default, int):
            default = format_length(default)
        elif f.metadata.get("kind") == "lengths" and isinstance(default, list):
            default = ",".join(format_length(v) for v in default)
        rows.append((key, _type_name(hint), repr(default), f.metadata.get("doc", "")))
    return rows


def require_target(target: int | None, original: int, key: str) -> int:
    """A stage's target must exist and exceed the model's original window."""
    if target is None:
        raise RecipeError(f"{key} is not set; pass --target 256k (or set {key} in the recipe)")
    if target <= original:
        raise RecipeError(
            f"{key}={format_length(target)} is not larger than the model's original window "
            f"{format_length(original)}; pass a longer --target")
    return target

"""A pre-scaled model's own RoPE as an absolute `FactorSet`, so that it can be installed, compared and extended.

Models such as Llama-3.1 (`rope_type: llama3`), YaRN models, Phi-3-mini-128k (`longrope`) and linearly
interpolated ones ship a config that already scales RoPE. Their frequencies are a fixed per-pair divisor of
the plain theta_i = rope_theta ** (-2i / d), so they are one FactorSet: lambda_i = theta_i / native_inv_freq_i
with the config's attention factor (and, for longrope, its short factors below the pretraining window).
`native_factors` computes them with transformers' own `ROPE_INIT_FUNCTIONS` for the model's config, so that
`install_factors(model, native_factors(model, layout))` runs the model exactly as shipped.

What it means for the rest of longrope (see also `rope.layout`):

* `target_length` of the native set is the window the model is trained for as shipped
  (`layout.shipped_length`); a further extension is relative to that window, and
  `baselines.baseline_factors(name, layout, L, native=...)` applies PI / NTK / YaRN on top of the native
  factors for s' = L / shipped window (`none` is the native set itself: the model as shipped).
* `native_base` gives the same set as the base of a progressive search, exactly like `search.base_factors`
  does for a model fine-tuned by longrope: absolute = relative x base.long_factor, seeds and the grid built
  for s' = target / base.target_length, YaRN's seed ramp reading theta_i / base_i over that window
  (`baselines.yarn_relative_factors`), short factors (longrope) and attention (`search.attention=base`)
  taken from the base.
* `dynamic` is not expressible: its frequencies are recomputed from the current length. Within its window it
  is plain RoPE (so `native_factors` returns None), beyond it it is the `dynamic-ntk` baseline with the
  config's factor (`baselines.dynamic_ntk_factors(layout, L, factor=...)`).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch

from longrope_cli.errors import ModelError
from longrope_cli.rope.factors import FactorSet
from longrope_cli.rope.layout import PLAIN_TYPES, PRESCALED_TYPES, RopeLayout, layout_from_config

log = logging.getLogger(__name__)

NATIVE_METHOD = "native"


def _config_of(model_or_config: Any) -> Any:
    """The transformers config of a LoadedModel, a transformers model, or a config itself."""
    obj = getattr(model_or_config, "model", model_or_config)  # LoadedModel -> its transformers model
    config = getattr(obj, "config", obj)
    if not hasattr(config, "max_position_embeddings"):
        raise ModelError(f"{type(model_or_config).__name__} is neither a transformers model nor its config")
    return config


def _layout_of(model_or_config: Any, layout: RopeLayout | None, config: Any) -> RopeLayout:
    if layout is not None:
        return layout
    own = getattr(model_or_config, "layout", None)
    if isinstance(own, RopeLayout):
        return own
    return layout_from_config(config, name=getattr(config, "_name_or_path", "model") or "model")


def rope_parameters_of(config: Any) -> dict[str, Any]:
    """The config's RoPE dict (transformers 5 `rope_parameters`, 4.x `rope_scaling`), {} for plain RoPE."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params) if isinstance(params, dict) else {}


def rope_type_of(config: Any) -> str:
    params = rope_parameters_of(config)
    return str(params.get("rope_type", params.get("type")) or "default")


def _init_fn(rope_type: str):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    try:
        return ROPE_INIT_FUNCTIONS[rope_type]
    except KeyError:
        raise ModelError(f"this transformers has no RoPE init function for rope_type {rope_type!r}") from None


def _native_inv_freq(config: Any, rope_type: str, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """transformers' own (inv_freq, attention_scaling) for the config, on a copy (init functions standardise it)."""
    own = copy.deepcopy(config)
    inv_freq, attention = _init_fn(rope_type)(own, torch.device("cpu"), seq_len=seq_len)
    return inv_freq.detach().to(torch.float32).cpu(), float(attention)


def _module_inv_freq(layout: RopeLayout, lam: list[float]) -> torch.Tensor:
    """inv_freq from lambda as our rotary module and transformers' longrope compute it: 1 / (lambda x base^(2i/d))."""
    exponent = torch.arange(0, layout.rotary_dim, 2, dtype=torch.int64).to(dtype=torch.float)
    return 1.0 / (torch.tensor(lam, dtype=torch.float32) * layout.rope_theta ** (exponent / layout.rotary_dim))


def _lambdas(layout: RopeLayout, inv_freq: torch.Tensor, rope_type: str) -> tuple[float, ...]:
    """lambda_i = theta_i / inv_freq_i, each written with the fewest digits that give back transformers'
    float32 inv_freq_i bit for bit through our rotary module (4.0 rather than 3.9999999), else the raw ratio
    (then within an ulp: llama3's smoothed band is computed in another order than 1 / (lambda x base^(2i/d)))."""
    if inv_freq.numel() != layout.pairs:
        raise ModelError(
            f"{rope_type} RoPE of {layout.name!r} has {inv_freq.numel()} frequencies but the layout has "
            f"{layout.pairs} pairs; this model's rotary layout is not supported")
    raw = (layout.inv_freq().double() / inv_freq.double()).tolist()
    bad = [i for i, v in enumerate(raw) if not math.isfinite(v) or v <= 0]
    if bad:
        raise ModelError(f"{rope_type} RoPE of {layout.name!r}: pair {bad[0]} has frequency {inv_freq[bad[0]]}, "
                         "which no positive divisor of theta_i gives")
    chosen: list[float | None] = [None] * len(raw)
    for digits in (4, 6, 7, 8, 9, 12, 17):
        candidates = [float(f"{v:.{digits}g}") for v in raw]
        exact = (_module_inv_freq(layout, candidates) == inv_freq).tolist()
        for i, ok in enumerate(exact):
            if ok and chosen[i] is None:
                chosen[i] = candidates[i]
    return tuple(c if c is not None else r for c, r in zip(chosen, raw, strict=True))


def _attention_policy(rope_type: str, params: dict[str, Any], attention: float) -> str:
    """How the native attention factor came about: su / yarn when derived by that formula, else the number."""
    if attention == 1.0:
        return "none"
    if params.get("attention_factor") is None:
        if rope_type == "longrope":
            return "su"
        if rope_type == "yarn" and not (params.get("mscale") and params.get("mscale_all_dim")):
            return "yarn"
    return repr(float(attention))


def native_factors(model_or_config: Any, layout: RopeLayout | None = None) -> FactorSet | None:
    """The model's own RoPE as an absolute FactorSet, or None for plain RoPE (rope_type default) and dynamic.

    `model_or_config`: a transformers model, its config, or a `LoadedModel`. lambda_i = theta_i / inv_freq_i
    of transformers' own init function for the config; attention = its attention scaling; for longrope also
    `short_factor` (used while the sequence fits `layout.original_length`, the config's
    original_max_position_embeddings, as transformers does); target_length = the shipped window
    (`layout.shipped_window`). Installed with `install_factors` it reproduces transformers' logits.

    Example:
        >>> native = native_factors(lm.model, lm.layout)  # Llama-3.1: target_length 131072  # doctest: +SKIP
        >>> install_factors(lm.model, native, lm.layout)  # the model as shipped  # doctest: +SKIP
    """
    config = _config_of(model_or_config)
    layout = _layout_of(model_or_config, layout, config)
    params = rope_parameters_of(config)
    rope_type = rope_type_of(config)
    if rope_type in PLAIN_TYPES:
        return None
    if rope_type not in PRESCALED_TYPES:
        log.warning("%s: rope_type %r cannot be written as fixed per-pair factors%s; treating its native RoPE as "
                    "plain RoPE", layout.name, rope_type,
                    " (its frequencies change with the length)" if rope_type == "dynamic" else "")
        return None
    provenance: dict[str, Any] = {"native": rope_type, "model": layout.name}
    short: tuple[float, ...] | None = None
    if rope_type == "longrope":
        switch = params.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None) or layout.original_length
        short_inv, attention = _native_inv_freq(config, rope_type, None)
        long_inv, _ = _native_inv_freq(config, rope_type, int(switch) + 1)
        short = _lambdas(layout, short_inv, rope_type)
        if int(switch) != layout.original_length:
            log.warning("%s: longrope switches to its long factors above %d, but the layout's original window "
                        "is %d (model.original_length?); our rotary module switches at the latter",
                        layout.name, int(switch), layout.original_length)
    else:
        long_inv, attention = _native_inv_freq(config, rope_type, None)
    return FactorSet(
        long_factor=_lambdas(layout, long_inv, rope_type),
        short_factor=short,
        attention=attention,
        attention_policy=_attention_policy(rope_type, params, attention),
        target_length=layout.shipped_window,
        method=NATIVE_METHOD,
        provenance=provenance,
    )


def native_base(lm_or_model: Any, layout: RopeLayout | None = None) -> FactorSet | None:
    """The base of a progressive search on a pre-scaled model: its native factors (None for plain RoPE).

    Use it as `search.base_factors` is used for a model fine-tuned by longrope: search relative factors r_i,
    install absolute r_i x base.long_factor[i], build the grid and the seeds for s' = target /
    base.target_length (the shipped window), seed YaRN with
    `yarn_relative_factors(layout, base.long_factor, base.target_length, target)`, keep base.short_factor
    (longrope models: the short regime as shipped) and, with `search.attention=base`, base.attention.
    An explicit `search.base_factors` should win over this (it is the same set for a longrope-exported
    fine-tuned model, and the only one for a model fine-tuned with n-hat > 0, whose config is plain RoPE).

    Example:
        >>> base = native_base(lm)  # Llama-3.1: lambda_i of llama3 scaling, target_length 131072  # doctest: +SKIP
    """
    native = native_factors(lm_or_model, layout)
    if native is None:
        return None
    return native.with_provenance(base="native")


def describe_native(layout: RopeLayout) -> str | None:
    """One line for the logs about a pre-scaled model, or None for plain RoPE."""
    if not layout.prescaled:
        return None
    return (f"{layout.name}: config scales RoPE ({layout.rope_type}), shipped window {layout.shipped_window} "
            f"(pretrained {layout.original_length}); baselines and native searches extend it relative to "
            "the shipped window")

"""The classic RoPE extensions, each written as a `FactorSet` so that one rotary module runs them all.

lambda_i is the divisor of theta_i (high frequency first). The formulas follow transformers'
`linear`, `dynamic` and `yarn` rope types exactly, which the tests check logit for logit.

On a pre-scaled model (Llama-3.1, YaRN, Phi-3-128k, linear; see `rope.native`) pass its native factors to
`baseline_factors(..., native=...)`: `none` is then the model as shipped, and PI / NTK / dynamic NTK / YaRN at
a length L are applied on top of the native factors, relative to the shipped window W = native.target_length:
absolute lambda_i = native_i x baseline_i(s' = L / W), attention = native attention x the baseline's own.
YaRN's ramp reads the native wavelengths theta_i / native_i over W (`yarn_relative_factors`). At L <= W every
baseline is the model as shipped. Short factors of a longrope model are kept: its short regime is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from longrope_cli.errors import RecipeError
from longrope_cli.rope.factors import FactorSet, attention_factor
from longrope_cli.rope.layout import RopeLayout


def none_factors(layout: RopeLayout, target_length: int) -> FactorSet:
    """Plain RoPE: no interpolation (positions beyond the window extrapolate)."""
    return FactorSet(long_factor=(1.0,) * layout.pairs, target_length=target_length, method="none")


def pi_factors(layout: RopeLayout, target_length: int) -> FactorSet:
    """Position interpolation: every frequency divided by s."""
    s = max(1.0, layout.scale(target_length))
    return FactorSet(long_factor=(s,) * layout.pairs, target_length=target_length, method="pi")


def _ntk_lambdas(layout: RopeLayout, alpha: float) -> tuple[float, ...]:
    """lambda_i for base' = base * alpha ** (d / (d - 2)), i.e. lambda_i = alpha ** (2i / (d - 2))."""
    d = layout.rotary_dim
    return tuple(alpha ** (2 * i / (d - 2)) for i in range(layout.pairs))


def ntk_factors(layout: RopeLayout, target_length: int) -> FactorSet:
    """NTK-aware scaling: raise the base so the lowest frequency is interpolated by s, the highest not at all."""
    s = max(1.0, layout.scale(target_length))
    return FactorSet(long_factor=_ntk_lambdas(layout, s), target_length=target_length, method="ntk")


def dynamic_ntk_factors(layout: RopeLayout, target_length: int, factor: float = 1.0) -> FactorSet:
    """Dynamic NTK (YaRN paper, section 3.3) at the current length: NTK-aware scaling with
    alpha = factor * L / L_orig - (factor - 1), i.e. alpha = L / L_orig with the published factor 1.

    transformers' `dynamic` rope type computes the same with its configured `factor`; pass that factor to
    reproduce a model configured so. Scored in one forward, dynamic NTK at length L is NTK-aware at s = L /
    L_orig; the two differ only when the length grows during generation.
    """
    s = layout.scale(target_length)
    alpha = factor * s - (factor - 1.0) if s > 1.0 else 1.0
    return FactorSet(long_factor=_ntk_lambdas(layout, alpha), target_length=target_length, method="dynamic-ntk")


def _yarn_blend(extrapolate: float, s: float) -> float:
    """lambda for a pair that keeps `extrapolate` of theta_i and takes the rest of theta_i / s (YaRN's blend)."""
    return 1.0 / ((1.0 - extrapolate) / s + extrapolate)


def yarn_factors(
    layout: RopeLayout, target_length: int, beta_fast: float = 32.0, beta_slow: float = 1.0
) -> FactorSet:
    """YaRN ("NTK-by-parts"): extrapolate fast wavelengths, interpolate slow ones by s, ramp in between;
    attention factor 0.1 ln s + 1."""
    s = max(1.0, layout.scale(target_length))
    d, base, original = layout.rotary_dim, layout.rope_theta, layout.original_length

    def correction_dim(rotations: float) -> float:
        return (d * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), d - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    factors = []
    for i in range(layout.pairs):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        extrapolate = 1.0 - ramp  # 1: keep theta_i, 0: divide by s
        factors.append(_yarn_blend(extrapolate, s))
    return FactorSet(
        long_factor=tuple(factors),
        target_length=target_length,
        method="yarn",
        attention=attention_factor("yarn", s, original),
        attention_policy="yarn",
    )


def yarn_relative_factors(
    layout: RopeLayout, base_factors: tuple[float, ...], base_length: int, target_length: int,
    beta_fast: float = 32.0, beta_slow: float = 1.0,
) -> tuple[float, ...]:
    """YaRN for a model fine-tuned with `base_factors` at `base_length`, as factors relative to the base.

    That model's own RoPE is theta_i / b_i over a window of base_length, so YaRN's ramp must read the turns
    each pair makes in that window with its base factor applied. Using theta_i alone (the original model's
    wavelengths) leaves the pairs the fine-tuning saw for less than one turn barely interpolated, a far worse
    seed for the progressive search. The ramp is linear in
    log(turns) between beta_slow and beta_fast, which is transformers' linear-in-dimension ramp without its
    rounding to whole dimensions.
    """
    s = max(1.0, target_length / base_length)
    inv_freq = layout.inv_freq().tolist()
    span = math.log(beta_fast / beta_slow)
    factors = []
    for theta, base in zip(inv_freq, base_factors, strict=True):
        turns = base_length * theta / base / (2 * math.pi)
        extrapolate = min(max(math.log(max(turns, 1e-12) / beta_slow) / span, 0.0), 1.0)
        factors.append(_yarn_blend(extrapolate, s))
    return tuple(factors)


BASELINES: dict[str, Callable[[RopeLayout, int], FactorSet]] = {
    "none": none_factors,
    "pi": pi_factors,
    "ntk": ntk_factors,
    "dynamic-ntk": dynamic_ntk_factors,
    "yarn": yarn_factors,
}


def on_native(name: str, layout: RopeLayout, target_length: int, native: FactorSet) -> FactorSet:
    """Baseline `name` at `target_length` on top of a pre-scaled model's native factors (see the module docstring)."""
    if native.pairs != layout.pairs:
        raise RecipeError(f"native factors have {native.pairs} pairs, model {layout.name!r} {layout.pairs}")
    window = int(native.target_length or layout.shipped_window)
    provenance = {**native.provenance, "on_native": True, "native_window": window}
    if name == "none":
        return replace(native, method="none", target_length=target_length, provenance=provenance)
    if name not in BASELINES:
        raise RecipeError(f"unknown method {name!r}; use one of {', '.join(BASELINES)} or a factor file")
    if name == "yarn":
        relative = yarn_relative_factors(layout, native.long_factor, window, target_length)
        s = max(1.0, target_length / window)
        own_attention = attention_factor("yarn", s, window)
    else:
        geometry = replace(layout, original_length=window)  # s' = target / shipped window
        base = BASELINES[name](geometry, target_length)
        relative, own_attention = base.long_factor, base.attention
    attention = native.attention * own_attention
    policy = native.attention_policy if own_attention == 1.0 else repr(float(attention))
    return FactorSet(
        long_factor=tuple(r * b for r, b in zip(relative, native.long_factor, strict=True)),
        short_factor=native.short_factor,
        start_tokens=native.start_tokens,
        attention=attention,
        attention_policy=policy,
        target_length=target_length,
        method=name,
        provenance=provenance,
    )


def baseline_factors(name: str, layout: RopeLayout, target_length: int,
                     native: FactorSet | None = None) -> FactorSet:
    """Look up a baseline by name (none, pi, ntk, dynamic-ntk, yarn).

    With `native` (a pre-scaled model's own factors, `rope.native.native_factors`), the baseline is applied on
    top of them relative to the shipped window and `none` is the model as shipped; without, it is relative to
    plain RoPE over `layout.original_length`, as always.
    """
    if native is not None:
        return on_native(name, layout, target_length, native)
    try:
        return BASELINES[name](layout, target_length)
    except KeyError:
        raise RecipeError(f"unknown method {name!r}; use one of {', '.join(BASELINES)} or a factor file") from None

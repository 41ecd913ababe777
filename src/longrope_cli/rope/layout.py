"""What a model's rotary embedding looks like: the facts every factor set is checked against.

Pre-scaled models. A config may already scale RoPE (`rope_type` linear, llama3 as in Llama-3.1, yarn,
longrope as in Phi-3-mini-128k). The layout records that with two fields, `rope_type` and
`shipped_length`, and keeps `original_length` exactly what it was before:

* `original_length` is the window the *plain* frequencies theta_i were trained for: the pretraining
  window (`original_max_position_embeddings`, else `max_position_embeddings`). Every factor set in this
  project is absolute, i.e. a divisor of those plain theta_i, so this is the window they are measured
  against: factor files record it and are refused on a model with another one, su attention factors and
  the long/short switch (transformers' longrope switches at `original_max_position_embeddings`, which
  `LongRopeRotaryEmbedding` reproduces with this field) are computed from it, and export writes it as
  `original_max_position_embeddings`. A fine-tuned model exported by `longrope finetune` is itself a
  pre-scaled longrope model; keeping this meaning is what lets its factors.json (saved with the base
  model's layout) still load against it for a progressive search, and what keeps linear / yarn configs
  reading s = target / original_length as before.
* `shipped_length` is the window the model is trained for *as shipped*, with its own scaling applied:
  `max_position_embeddings` for linear, llama3 and longrope (long mode), and for yarn the larger of that
  and factor x original (Qwen-style configs leave max_position_embeddings at the pretraining window).
  A further extension of a pre-scaled model is relative to this window, not to the pretraining one:
  the model already works up to it (Llama-3.1 up to 128k, not 8k), so a baseline at L on top of the
  model's own frequencies interpolates by s' = L / shipped_length, exactly as the progressive search
  extends a fine-tuned model relative to its fine-tuning window (`FactorSet.target_length` of the base).
  `rope.native.native_factors` returns the model's own RoPE as an absolute FactorSet whose
  `target_length` is this window. `shipped_length` is None for plain RoPE models (and for dynamic, which
  is plain RoPE inside its window); `shipped_window` is it or else `original_length`.

Why not move `original_length` itself to the shipped window: it is the denominator of everything absolute
(factor files, su, the short/long switch, export), and a pre-scaled model's factors stay absolute; the
shipped window is a second, separate fact that only what extends the model *relative to its own RoPE*
(baselines on top of the native factors, `native_base` for a progressive search) needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from longrope_cli.errors import ModelError

# rope types whose frequencies are fixed (do not depend on the sequence length) and that transformers computes
# as a per-pair divisor of theta_i: `rope.native.native_factors` turns them into an exact absolute FactorSet.
PRESCALED_TYPES = ("linear", "llama3", "yarn", "longrope")
PLAIN_TYPES = ("default", None)


@dataclass(frozen=True)
class RopeLayout:
    """Rotary geometry of one model: theta_i = rope_theta ** (-2i / rotary_dim), i < rotary_dim / 2."""

    rotary_dim: int
    rope_theta: float
    original_length: int
    head_dim: int
    model_type: str = "unknown"
    name: str = "unknown"
    rope_type: str = "default"  # the config's own RoPE as shipped (default, linear, llama3, yarn, longrope, ...)
    shipped_length: int | None = None  # window the pre-scaled model is trained for as shipped; None if plain

    @property
    def prescaled(self) -> bool:
        """True when the config already scales RoPE with fixed per-pair factors (linear, llama3, yarn, longrope)."""
        return self.rope_type in PRESCALED_TYPES

    @property
    def shipped_window(self) -> int:
        """The window a further extension is relative to: `shipped_length` if pre-scaled, else `original_length`."""
        return self.shipped_length or self.original_length

    @property
    def pairs(self) -> int:
        """Number of frequency pairs, i.e. the length of a factor list."""
        return self.rotary_dim // 2

    def inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        """theta_i in float32, computed exactly as transformers does (so logits match bit for bit)."""
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
        return 1.0 / (self.rope_theta ** (exponent / self.rotary_dim))

    def scale(self, target_length: int) -> float:
        """s = target / original."""
        return target_length / self.original_length

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; rope_type / shipped_length only when not plain RoPE, so that the factor files and
        fingerprints of plain models are what they were before these fields existed."""
        data = asdict(self)
        defaults = {f.name: f.default for f in fields(self) if f.name in ("rope_type", "shipped_length")}
        for key, default in defaults.items():
            if data[key] == default:
                del data[key]
        return data


def _rope_parameters(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if params and "rope_type" not in params and all(isinstance(v, dict) for v in params.values()):
        raise ModelError("models with per-layer-type RoPE parameters (e.g. Gemma 3) are not supported yet")
    return dict(params)


def layout_from_config(config: Any, name: str = "unknown", original_length: int | None = None) -> RopeLayout:
    """Read the rotary layout from a transformers config (Llama, Mistral, Qwen2, Phi-3 and alike)."""
    params = _rope_parameters(config)
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ModelError(f"model {name!r} has no rope_theta in its config: it does not look like a RoPE model")
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if not head_dim:
        raise ModelError(f"model {name!r}: cannot tell the attention head size from its config")
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2:
        raise ModelError(f"model {name!r}: rotary dimension {rotary_dim} is odd; cannot pair frequencies")
    original = (
        original_length
        or params.get("original_max_position_embeddings")
        or getattr(config, "original_max_position_embeddings", None)
        or getattr(config, "max_position_embeddings", None)
    )
    if not original:
        raise ModelError(f"model {name!r}: no max_position_embeddings in its config; set model.original_length")
    rope_type = params.get("rope_type", params.get("type")) or "default"
    return RopeLayout(
        rotary_dim=rotary_dim,
        rope_theta=float(theta),
        original_length=int(original),
        head_dim=int(head_dim),
        model_type=str(getattr(config, "model_type", "unknown")),
        name=name,
        rope_type=str(rope_type),
        shipped_length=_shipped_length(config, params, str(rope_type)),
    )


def _shipped_length(config: Any, params: dict[str, Any], rope_type: str) -> int | None:
    """The window a pre-scaled model is trained for as shipped (see the module docstring); None if not pre-scaled."""
    if rope_type not in PRESCALED_TYPES:
        return None
    shipped = getattr(config, "max_position_embeddings", None)
    if rope_type == "yarn":
        factor = params.get("factor")
        pretrained = params.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None)
        if factor and pretrained:
            shipped = max(int(shipped or 0), round(float(factor) * int(pretrained)))
    return int(shipped) if shipped else None

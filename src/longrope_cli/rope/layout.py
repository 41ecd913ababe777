"""What a model's rotary embedding looks like: the facts every factor set is checked against."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from longrope_cli.errors import ModelError


@dataclass(frozen=True)
class RopeLayout:
    """Rotary geometry of one model: theta_i = rope_theta ** (-2i / rotary_dim), i < rotary_dim / 2."""

    rotary_dim: int
    rope_theta: float
    original_length: int
    head_dim: int
    model_type: str = "unknown"
    name: str = "unknown"

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
        return asdict(self)


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
    return RopeLayout(
        rotary_dim=rotary_dim,
        rope_theta=float(theta),
        original_length=int(original),
        head_dim=int(head_dim),
        model_type=str(getattr(config, "model_type", "unknown")),
        name=name,
    )

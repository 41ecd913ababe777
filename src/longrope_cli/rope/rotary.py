"""One rotary-embedding module for every method, installed in place into a loaded transformers model.

Recent transformers models (Llama, Mistral, Qwen2, Phi-3, ...) compute `(cos, sin)` once per forward
in a `*RotaryEmbedding` module called as `rotary_emb(hidden_states, position_ids)`. We swap that
module for `LongRopeRotaryEmbedding`, whose factors can be changed between forwards without
reloading the model: during a search only these tables change between candidates.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from longrope_cli.errors import ModelError
from longrope_cli.rope.factors import FactorSet
from longrope_cli.rope.layout import PLAIN_TYPES, PRESCALED_TYPES, RopeLayout, layout_from_config

log = logging.getLogger(__name__)

# rope types replaced without a warning: plain RoPE, and the fixed per-pair scalings (see rope/native.py)
EXPRESSIBLE_TYPES = (*PLAIN_TYPES, *PRESCALED_TYPES)


class LongRopeRotaryEmbedding(nn.Module):
    """cos/sin tables for angle(n, i) = n * theta_i / lambda_i (n >= n-hat), n * theta_i (n < n-hat), times the
    attention factor. Short factors (if any) apply while max(position_ids) + 1 <= the original window."""

    def __init__(self, layout: RopeLayout, original: nn.Module | None = None) -> None:
        super().__init__()
        self.layout = layout
        self.register_buffer("inv_freq", layout.inv_freq(), persistent=False)
        self.register_buffer("long_inv_freq", layout.inv_freq(), persistent=False)
        self.register_buffer("short_inv_freq", layout.inv_freq(), persistent=False)
        self.has_short = False
        self.start_tokens = 0
        self.attention_scaling = 1.0
        self.factors: FactorSet | None = None
        # Kept outside the module tree so that state_dict()/parameters() do not see it twice.
        self._original = [original]

    @property
    def original_module(self) -> nn.Module | None:
        return self._original[0]

    def _inv_freq_for(self, factors: tuple[float, ...]) -> torch.Tensor:
        device = self.inv_freq.device
        lam = torch.tensor(factors, dtype=torch.float32, device=device)
        exponent = torch.arange(0, self.layout.rotary_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
        # Same expression as transformers' longrope, so that exported models give identical logits.
        return 1.0 / (lam * self.layout.rope_theta ** (exponent / self.layout.rotary_dim))

    def set_factors(self, factors: FactorSet) -> None:
        """Switch to another factor set (cheap: only d/2-element tables change)."""
        factors.check(self.layout)
        self.long_inv_freq.copy_(self._inv_freq_for(factors.long_factor))
        self.has_short = factors.short_factor is not None
        if factors.short_factor is not None:
            self.short_inv_freq.copy_(self._inv_freq_for(factors.short_factor))
        self.start_tokens = int(factors.start_tokens)
        self.attention_scaling = float(factors.attention)
        self.factors = factors

    @torch.no_grad()
    def _tables(self, position_ids: torch.Tensor) -> torch.Tensor:
        positions = position_ids[..., None].float()
        inv_freq = self.long_inv_freq
        if self.has_short:
            # Like transformers' longrope: the whole sequence uses one set, chosen by its length.
            seq_len = position_ids.max() + 1
            inv_freq = torch.where(seq_len > self.layout.original_length, self.long_inv_freq, self.short_inv_freq)
        return positions * inv_freq

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        device_type = x.device.type if x.device.type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            position_ids = position_ids.to(self.inv_freq.device)
            freqs = self._tables(position_ids)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
            if self.start_tokens > 0:
                # The first n-hat positions keep the original model's cos/sin, angles and magnitude alike
                # (the official code copies the un-interpolated, un-tempered tables there).
                original = position_ids[..., None].float() * self.inv_freq
                original = torch.cat((original, original), dim=-1)
                keep = position_ids[..., None] < self.start_tokens
                cos = torch.where(keep, original.cos(), cos)
                sin = torch.where(keep, original.sin(), sin)
        return cos.to(dtype=x.dtype, device=x.device), sin.to(dtype=x.dtype, device=x.device)

    def extra_repr(self) -> str:
        method = self.factors.method if self.factors else "none"
        return f"method={method}, pairs={self.layout.pairs}, start_tokens={self.start_tokens}, " \
               f"attention={self.attention_scaling:.4f}, original_length={self.layout.original_length}"


def _rotary_slots(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every rotary embedding module of the model."""
    slots = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if isinstance(child, LongRopeRotaryEmbedding) or (
                "Rotary" in type(child).__name__ and hasattr(child, "inv_freq")
            ):
                slots.append((parent, attr, child))
    return slots


def install_factors(model: nn.Module, factors: FactorSet, layout: RopeLayout | None = None) -> RopeLayout:
    """Install `factors` into every rotary module of `model` (replacing transformers' module the first time).

    Returns the layout in use. Example:
        >>> layout = install_factors(model, pi_factors(layout_from_config(model.config), 2048))  # doctest: +SKIP
    """
    slots = _rotary_slots(model)
    if not slots:
        raise ModelError(
            f"{type(model).__name__} has no replaceable rotary embedding module (expected a *RotaryEmbedding "
            "with inv_freq, as in Llama, Mistral, Qwen2, Phi-3); this architecture is not supported")
    for parent, attr, module in slots:
        if isinstance(module, LongRopeRotaryEmbedding):
            module.set_factors(factors)
            layout = module.layout
            continue
        if layout is None:
            layout = layout_from_config(model.config, name=getattr(model.config, "_name_or_path", "model"))
        if module.inv_freq.numel() != layout.pairs:
            raise ModelError(
                f"{type(module).__name__} has {module.inv_freq.numel()} frequencies but the config implies "
                f"{layout.pairs}; this model's rotary layout is not supported")
        rope_type = getattr(module, "rope_type", "default")
        # linear, llama3, yarn and longrope are fixed per-pair divisors of theta_i: the factors installed are
        # absolute, and the model's own scaling is one of them (`rope.native.native_factors`, exact), so replacing
        # the module loses nothing. dynamic recomputes its frequencies from the length, which no factor set does.
        if rope_type not in EXPRESSIBLE_TYPES:
            log.warning("replacing %s rope scaling of %s with plain RoPE x the given factors: %s", rope_type, attr,
                        "its frequencies change with the length, which a factor set cannot express (the "
                        "dynamic-ntk baseline with its factor reproduces it at one length)"
                        if rope_type == "dynamic" else "longrope cannot express this rope type")
        replacement = LongRopeRotaryEmbedding(layout, original=module).to(module.inv_freq.device)
        replacement.set_factors(factors)
        setattr(parent, attr, replacement)
    assert layout is not None
    return layout


def remove_factors(model: nn.Module) -> None:
    """Put transformers' original rotary modules back."""
    for parent, attr, module in _rotary_slots(model):
        if isinstance(module, LongRopeRotaryEmbedding) and module.original_module is not None:
            setattr(parent, attr, module.original_module)


def installed_factors(model: nn.Module) -> FactorSet | None:
    """The factor set currently installed in `model`, or None for the model's own rotary embedding."""
    for _, _, module in _rotary_slots(model):
        if isinstance(module, LongRopeRotaryEmbedding):
            return module.factors
    return None


@contextmanager
def original_rotary(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put transformers' own rotary modules back, e.g. around `save_pretrained`, then ours again."""
    ours = [(parent, attr, module) for parent, attr, module in _rotary_slots(model)
            if isinstance(module, LongRopeRotaryEmbedding) and module.original_module is not None]
    for parent, attr, module in ours:
        setattr(parent, attr, module.original_module)
    try:
        yield model
    finally:
        for parent, attr, module in ours:
            setattr(parent, attr, module)

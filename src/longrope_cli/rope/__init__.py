"""RoPE factor sets, the classic baselines, the rotary module and Hugging Face export."""

from longrope_cli.rope.baselines import BASELINES, baseline_factors
from longrope_cli.rope.factors import FactorSet, attention_factor, load_factors
from longrope_cli.rope.layout import RopeLayout, layout_from_config
from longrope_cli.rope.rotary import (
    LongRopeRotaryEmbedding,
    install_factors,
    installed_factors,
    remove_factors,
)

__all__ = [
    "BASELINES",
    "FactorSet",
    "LongRopeRotaryEmbedding",
    "RopeLayout",
    "attention_factor",
    "baseline_factors",
    "install_factors",
    "installed_factors",
    "layout_from_config",
    "load_factors",
    "remove_factors",
]

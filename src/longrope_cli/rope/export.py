"""Export a model with LongRoPE factors as a Hugging Face directory that plain transformers loads.

The layout below is the one that transformers 4.57 and 5.x both read identically: top-level
`original_max_position_embeddings` and `rope_theta`, `max_position_embeddings` = target, and the same
longrope dict under both `rope_scaling` (read by 4.x) and `rope_parameters` (written by 5.x, which 4.57
would otherwise silently ignore and run as plain RoPE).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from longrope_cli.errors import FactorFileError
from longrope_cli.lengths import format_length
from longrope_cli.outputs import atomic_write_json
from longrope_cli.rope.factors import FactorSet
from longrope_cli.rope.layout import RopeLayout
from longrope_cli.rope.rotary import original_rotary

log = logging.getLogger(__name__)


def longrope_rope_parameters(factors: FactorSet, layout: RopeLayout, target_length: int) -> dict[str, Any]:
    """The `rope_scaling` / `rope_parameters` dict of transformers' `longrope` rope type."""
    if factors.start_tokens:
        raise FactorFileError(
            f"factors keep n-hat={factors.start_tokens} start tokens un-interpolated, which transformers' longrope "
            "cannot express; search with search.start_tokens=0 for an exportable result (or load with "
            "longrope_cli.install_factors)")
    # Without short factors, `longrope eval` and the search run the long factors at every length; so must the
    # export (short = 1.0 under the long attention factor would be a third model, neither original nor measured).
    short = factors.short_factor if factors.short_factor is not None else factors.long_factor
    return {
        "rope_type": "longrope",
        "short_factor": list(short),
        "long_factor": list(factors.long_factor),
        "original_max_position_embeddings": layout.original_length,
        "factor": target_length / layout.original_length,
        # Written explicitly: transformers would otherwise derive it from `factor` (the su policy),
        # which silently differs from a yarn or fixed attention scale.
        "attention_factor": float(factors.attention),
    }


def exportable_config(config: dict[str, Any], factors: FactorSet, layout: RopeLayout, target_length: int) -> dict:
    """Rewrite a config.json mapping so that plain transformers runs `factors` at up to `target_length`."""
    params = longrope_rope_parameters(factors, layout, target_length)
    config = dict(config)
    config["max_position_embeddings"] = target_length
    config["original_max_position_embeddings"] = layout.original_length
    config["rope_theta"] = layout.rope_theta
    config["rope_scaling"] = dict(params)
    config["rope_parameters"] = {**params, "rope_theta": layout.rope_theta}
    if layout.rotary_dim != layout.head_dim:
        partial = layout.rotary_dim / layout.head_dim
        config["rope_parameters"]["partial_rotary_factor"] = partial
        config["rope_scaling"]["partial_rotary_factor"] = partial
    return config


EXPORT_MARKER = ".longrope-export"  # in every folder `export_model` writes: the only folders it may replace


def _check_out(out: Path) -> None:
    """Export replaces `out` as a whole, so it must be new, empty, or a previous export: never the user's files."""
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise FactorFileError(f"--out {out} is the working folder or one above it; export into a new folder")
    if out.exists() and not out.is_dir():
        raise FactorFileError(f"--out {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise FactorFileError(f"--out {out} already holds files that longrope export did not write; choose a new or "
                              "empty folder (a previous export there would be replaced)")


def write_model_folder(model: Any, tokenizer: Any, out: Path, factors: FactorSet, layout: RopeLayout,
                       edit_config: Callable[[dict[str, Any]], dict[str, Any]], *,
                       state: dict[str, Any] | None = None, marker: bool = False) -> Path:
    """Write a Hugging Face folder (weights, tokenizer, edited config.json, factors.json) into OUT.partial and
    rename it to OUT, so that it appears complete or not at all. transformers' own rotary modules are saved,
    not ours. `state`: the weights to save instead of the model's own (the fine-tune's unsharded ones).
    `marker`: tag the folder as longrope export's, the only folders `export_model` may later replace."""
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        if marker and not (tmp / EXPORT_MARKER).is_file():
            raise FactorFileError(f"{tmp} exists and was not written by longrope export; move it away or choose "
                                  "another --out")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if marker:
        (tmp / EXPORT_MARKER).write_text("written by longrope export\n", encoding="utf-8")
    with original_rotary(model):
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    from longrope_cli.hf_compat import save_tokenizer  # a tokenizer_config.json transformers 4.57 loads too

    save_tokenizer(tokenizer, tmp)
    config_path = tmp / "config.json"
    atomic_write_json(config_path, edit_config(json.loads(config_path.read_text(encoding="utf-8"))))
    factors.save(tmp / "factors.json", layout)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def check_export(factors: FactorSet, layout: RopeLayout, out_dir: str | Path, target_length: int | None = None) -> int:
    """Everything `export_model` refuses, checked before anything is written; returns the export's target."""
    target = target_length or factors.target_length
    if not target or target <= layout.original_length:
        raise FactorFileError(
            f"export needs a target longer than the original window {format_length(layout.original_length)}; "
            "pass --target")
    factors.check(layout, source="export")
    longrope_rope_parameters(factors, layout, target)  # n-hat > 0 cannot be expressed
    _check_out(Path(out_dir).resolve())
    return target


def export_model(model: Any, tokenizer: Any, factors: FactorSet, layout: RopeLayout, out_dir: str | Path,
                 target_length: int | None = None) -> Path:
    """Write `out_dir` (weights, tokenizer, config with longrope factors, factors.json) for plain transformers.

    Example:
        >>> export_model(lm.model, lm.tokenizer, factors, lm.layout, "runs/export")  # doctest: +SKIP
    """
    target = check_export(factors, layout, out_dir, target_length)
    out = Path(out_dir).resolve()
    return write_model_folder(model, tokenizer, out, factors.with_provenance(exported_to=str(out)), layout,
                              lambda config: exportable_config(config, factors, layout, target), marker=True)

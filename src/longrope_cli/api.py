"""The Python API: the same library functions the CLI stages call, in a few importable names.

Example (runs as written on the bundled test bed):
    >>> from longrope_cli import load_model, baseline_factors, install_factors, perplexity
    >>> lm = load_model("testbed")
    >>> install_factors(lm.model, baseline_factors("yarn", lm.layout, 2048))  # doctest: +SKIP
    >>> perplexity(lm, lengths=[2048])                                         # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longrope_cli.lengths import parse_length
from longrope_cli.models import LoadedModel, load_model
from longrope_cli.rope.factors import FactorSet, load_factors
from longrope_cli.rope.layout import RopeLayout
from longrope_cli.rope.rotary import install_factors, installed_factors, remove_factors


def as_factor_set(factors: FactorSet | str | Path, layout: RopeLayout) -> FactorSet:
    """A FactorSet from an object or a factor file path, checked against the model's layout."""
    if isinstance(factors, FactorSet):
        return factors.check(layout)
    return load_factors(factors, layout)


def use_factors(lm: LoadedModel, factors: FactorSet | str | Path | None) -> FactorSet | None:
    """Install a factor set (object or file) on a loaded model; None puts the model's own RoPE back."""
    if factors is None:
        remove_factors(lm.model)
        return None
    factor_set = as_factor_set(factors, lm.layout)
    install_factors(lm.model, factor_set, lm.layout)
    return factor_set


def save_factors(factors: FactorSet, layout: RopeLayout, path: str | Path) -> Path:
    """Write a factor file atomically (JSON, versioned; see README "Factor file format")."""
    return factors.save(path, layout)


def export(model: str | LoadedModel, factors: FactorSet | str | Path, out_dir: str | Path,
           short_factors: FactorSet | str | Path | None = None, target_length: int | str | None = None,
           device: str = "cpu") -> Path:
    """Export model + factors as a Hugging Face directory that plain transformers loads.

    `short_factors` (optional) supplies short_factor: a file's own short_factor if it has one, else its
    long_factor. Example:
        >>> export("testbed", "runs/search-2k/factors.json", "runs/export-2k")  # doctest: +SKIP
    """
    from dataclasses import replace

    from longrope_cli.rope.export import export_model

    for source in (factors, short_factors):  # fail on a bad file before loading a large model
        if source is not None and not isinstance(source, FactorSet):
            load_factors(source)
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    long_set = as_factor_set(factors, lm.layout)
    if short_factors is not None:
        short_set = as_factor_set(short_factors, lm.layout)
        short = short_set.short_factor if short_set.short_factor is not None else short_set.long_factor
        long_set = replace(long_set, short_factor=short)
    target = parse_length(target_length, "--target") if target_length is not None else None
    return export_model(lm.model, lm.tokenizer, long_set, lm.layout, out_dir, target_length=target)


def perplexity(lm: LoadedModel, lengths: list[int | str], documents: int = 5, split: str = "eval",
               corpus: str = "testbed", chunk: int = 1024, windows_per_doc: int = 0) -> dict[int, float]:
    """Perplexity of the model as installed, at each length, on `documents` windows of `split`.

    Example:
        >>> perplexity(load_model("testbed"), [256, 512])  # doctest: +SKIP
        {256: 41.2, 512: 52.3}
    """
    from longrope_cli.data import load_corpus, make_windows, tokenize_documents
    from longrope_cli.evaluate.perplexity import score_perplexity

    docs = tokenize_documents(load_corpus(corpus).split(split), lm.tokenizer)
    out = {}
    for length in lengths:
        n = parse_length(length)
        windows = make_windows(docs, n, documents, lm.tokenizer.bos_token_id, windows_per_doc, split)
        out[n] = score_perplexity(lm.model, windows, chunk=chunk).perplexity
    return out


def passkey(lm: LoadedModel, lengths: list[int | str], depths: tuple[float, ...] = (0.0, 0.5, 1.0),
            trials: int = 10, seed: int = 0) -> dict[int, float]:
    """Passkey retrieval accuracy per length (averaged over depths) of the model as installed."""
    from longrope_cli.evaluate.passkey import score_passkey

    results = score_passkey(lm.model, lm.tokenizer, [parse_length(n) for n in lengths], list(depths), trials, seed)
    by_length: dict[int, list[Any]] = {}
    for r in results:
        by_length.setdefault(r.length, []).append(r)
    return {n: sum(r.correct for r in rs) / sum(r.trials for r in rs) for n, rs in by_length.items()}


__all__ = [
    "FactorSet",
    "LoadedModel",
    "as_factor_set",
    "export",
    "install_factors",
    "installed_factors",
    "load_factors",
    "load_model",
    "passkey",
    "perplexity",
    "remove_factors",
    "save_factors",
    "use_factors",
]

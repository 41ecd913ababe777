"""The Python API: the same library functions the CLI stages call, in a few importable names.

Example (runs as written on the bundled test bed):
    >>> from longrope_cli import load_model, baseline_factors, install_factors, perplexity
    >>> lm = load_model("testbed")
    >>> install_factors(lm.model, baseline_factors("yarn", lm.layout, 2048))  # doctest: +SKIP
    >>> perplexity(lm, lengths=[2048])                                         # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from longrope_cli.errors import DataError
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


def export_factors(lm: LoadedModel, factors: FactorSet | str | Path, short_factors: FactorSet | str | Path | None = None,
                   target_length: int | str | None = None) -> tuple[FactorSet, int | None]:
    """The factor set an export writes, checked against the model, and the target (None: the file's).

    `short_factors` (optional) supplies short_factor: a file's own short_factor if it has one, else its
    long_factor. The official CSV has no target inside: `target_length` gives it one, and with it su."""
    target = parse_length(target_length, "--target") if target_length is not None else None
    if isinstance(factors, str | Path) and Path(factors).suffix.lower() == ".csv":
        long_set = load_factors(factors, lm.layout, target_length=target)
    else:
        long_set = as_factor_set(factors, lm.layout)
    if short_factors is not None:
        short_set = as_factor_set(short_factors, lm.layout)
        short = short_set.short_factor if short_set.short_factor is not None else short_set.long_factor
        long_set = replace(long_set, short_factor=short)
    return long_set, target


def export(model: str | LoadedModel, factors: FactorSet | str | Path, out_dir: str | Path,
           short_factors: FactorSet | str | Path | None = None, target_length: int | str | None = None,
           device: str = "cpu") -> Path:
    """Export model + factors as a Hugging Face directory that plain transformers loads.

    Example:
        >>> export("testbed", "runs/search-2k/factors.json", "runs/export-2k")  # doctest: +SKIP
    """
    from longrope_cli.rope.export import export_model

    for source in (factors, short_factors):  # fail on a bad file before loading a large model
        if source is not None and not isinstance(source, FactorSet):
            load_factors(source)
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    long_set, target = export_factors(lm, factors, short_factors, target_length)
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


@dataclass
class ExtendResult:
    """What `extend_context` returns: the model (factors installed), the factor set and its search record."""

    model: LoadedModel
    factors: FactorSet
    perplexity: float
    evaluations: int
    factors_path: Path
    record: Any  # search.runner.SearchResult: history, counters, seed perplexities


def fitness_windows(data: Any, tokenizer: Any, length: int, count: int) -> torch.Tensor:
    """Search windows (count, length) from a corpus path / 'testbed' (its search split), a list of texts,
    or token tensors (1-D: one document; 2-D: rows that already start with BOS, truncated to `length`)."""
    from longrope_cli.data import Document, load_corpus, make_windows, tokenize_documents

    bos = tokenizer.bos_token_id
    if isinstance(data, torch.Tensor):
        if data.dim() == 2:
            if data.shape[1] < length:
                raise DataError(f"token rows have {data.shape[1]} tokens; the target needs {length}")
            if data.shape[0] < count:
                raise DataError(f"{data.shape[0]} token rows given, search.documents={count} needed")
            return data[:count, :length].long()
        return make_windows([data.long().numpy()], length, count, bos, 0, "given")
    if isinstance(data, str | Path):
        docs = load_corpus(str(data)).split("search")
        return make_windows(tokenize_documents(docs, tokenizer), length, count, bos, 0, "search")
    if isinstance(data, list | tuple) and data and all(isinstance(t, str) for t in data):
        docs = [Document(id=str(i), text=t) for i, t in enumerate(data)]
        return make_windows(tokenize_documents(docs, tokenizer), length, count, bos, 0, "given")
    raise DataError("data must be a corpus path or 'testbed', a list of texts, or a tensor of token ids")


def extend_context(model: LoadedModel | str, data: Any, target_length: int | str, *,
                   out_dir: str | Path | None = None, progress: bool = False, **search_options: Any) -> ExtendResult:
    """Search LongRoPE factors for `target_length` on `data` and install the best ones on the model.

    `search_options` are `search:` recipe keys (population, iterations, max_evals, documents, start_tokens,
    racing, seed, ...); unknown names are refused with a suggestion. The search record (factors.json,
    candidates.jsonl, state.json) goes to `out_dir` (default: a fresh temporary folder).

    Example:
        >>> lm = load_model("testbed")                                                  # doctest: +SKIP
        >>> result = extend_context(lm, "testbed", "2k", max_evals=24, documents=2)      # doctest: +SKIP
        >>> result.factors.long_factor[:2], result.perplexity                           # doctest: +SKIP
    """
    from longrope_cli.recipe import build_recipe
    from longrope_cli.stages.search import resolve_search, run_search, validation_windows

    lm = model if isinstance(model, LoadedModel) else load_model(model)
    target = parse_length(target_length, "target_length")
    flags = {f"search.{key}": value for key, value in search_options.items()}
    recipe = build_recipe({"model": {"name": lm.name}}, flags={**flags, "search.target": target})
    resolved = resolve_search(recipe.search, target)
    windows = fitness_windows(data, lm.tokenizer, target, resolved.documents + validation_windows(resolved))
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="longrope-search-"))
    record = run_search(recipe, out, lm=lm, windows=windows, progress=progress)
    install_factors(lm.model, record.best, lm.layout)
    return ExtendResult(model=lm, factors=record.best, perplexity=record.best_perplexity,
                        evaluations=record.evaluations, factors_path=record.factors_path, record=record)


__all__ = [
    "ExtendResult",
    "extend_context",
    "fitness_windows",
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

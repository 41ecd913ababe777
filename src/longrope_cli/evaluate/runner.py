"""`longrope eval`: perplexity across lengths and passkey retrieval for several methods, resumable per cell.

A *method* is a baseline name (none, pi, ntk, dynamic-ntk, yarn; its factor set is generated for each
length, so dynamic NTK really is dynamic) or a factor file (its long/short pair switches at the original
window inside the rotary module, as transformers does). Every method scores the same eval-split windows.

Work is split into cells, one per (method, length) and kind (perplexity, passkey). Each finished cell
is written atomically to `cells/<kind>__<method>__<length>.json` with a fingerprint of what it scored
(factors, windows, model, settings); `resume=True` reuses every cell whose fingerprint still matches,
so a crashed eval restarts where it stopped. `results.json` is rewritten after every cell and
`complete.json` is written last.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longrope_cli.data import load_corpus, make_windows, split_windows, tokenize_documents
from longrope_cli.errors import LongRopeError, RecipeError
from longrope_cli.evaluate.perplexity import score_perplexity
from longrope_cli.lengths import format_length
from longrope_cli.losses import chunked_nll, decoder_of, shift_labels
from longrope_cli.models import LoadedModel, load_model
from longrope_cli.outputs import COMPLETE_MARKER, atomic_write_json, environment_info, mark_complete
from longrope_cli.recipe import Recipe, recipe_to_dict
from longrope_cli.rope.baselines import BASELINES, baseline_factors
from longrope_cli.rope.factors import FactorSet, load_factors
from longrope_cli.rope.layout import RopeLayout
from longrope_cli.rope.native import native_factors
from longrope_cli.rope.rotary import install_factors, installed_factors, remove_factors
from longrope_cli.seqchunk import chunked_mlps

log = logging.getLogger(__name__)

RESULTS_FORMAT = "longrope-eval"
RESULTS_VERSION = 1
CELLS_DIR = "cells"
FACTOR_SUFFIXES = (".json", ".csv")


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class EvalMethod:
    """One column of the comparison: a baseline generated per length, or the factors of one file."""

    label: str
    kind: str  # "baseline" or "file"
    source: str  # the baseline name, or the factor file path as given
    factors: FactorSet | None = None  # the loaded file (kind == "file")
    native: FactorSet | None = None  # a pre-scaled model's own factors: baselines go on top of them

    def factors_at(self, layout: RopeLayout, length: int) -> FactorSet:
        """The factor set scored at `length` (baselines are regenerated for each length; on a pre-scaled model
        `none` is the model as shipped and the others extend it relative to its shipped window)."""
        if self.factors is not None:
            return self.factors
        return baseline_factors(self.source, layout, length, native=self.native)


def _file_label(path: Path) -> str:
    """A readable name for a factor file: its folder for `.../NAME/factors.json`, else its stem."""
    if path.name == "factors.json" and path.parent.name not in ("", "."):
        return path.parent.name
    if path.is_dir():
        return path.name
    return path.stem


def check_method_names(names: list[str]) -> list[tuple[str, str]]:
    """(kind, name) per method, checked without a model: a typo or a missing file fails before any loading."""
    if not names:
        raise RecipeError("eval.methods is empty; pass e.g. --methods none,pi,ntk,yarn,runs/search-2k/factors.json")
    checked = []
    for raw in names:
        name = str(raw).strip()
        baseline = name.lower().replace("_", "-")
        if baseline in BASELINES:
            checked.append(("baseline", baseline))
            continue
        path = Path(name).expanduser()
        if not (path.exists() or "/" in name or name.lower().endswith(FACTOR_SUFFIXES)):
            close = difflib.get_close_matches(baseline, list(BASELINES), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RecipeError(f"unknown method {name!r}: {hint}use {', '.join(BASELINES)} or a factor file "
                              "(.json / .csv)")
        load_factors(path)  # one-line FactorFileError if missing or unreadable
        checked.append(("file", name))
    return checked


def resolve_methods(names: list[str], layout: RopeLayout) -> list[EvalMethod]:
    """Baseline names and factor files -> methods with unique labels; every mistake is a one-line error."""
    methods: list[EvalMethod] = []
    for kind, name in check_method_names(names):
        if kind == "baseline":
            methods.append(EvalMethod(label=name, kind="baseline", source=name))
            continue
        path = Path(name).expanduser()
        factors = load_factors(path, layout)  # refuses factors made for another model, in one line
        methods.append(EvalMethod(label=_file_label(path), kind="file", source=name, factors=factors))
    seen: dict[str, int] = {}
    unique = []
    for method in methods:
        count = seen.get(method.label, 0)
        seen[method.label] = count + 1
        if method.kind == "baseline" and count:
            raise RecipeError(f"eval.methods lists {method.label!r} twice; give each method once")
        unique.append(method if not count else dataclasses.replace(method, label=f"{method.label}-{count + 1}"))
    return unique


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "method"


def _factor_summary(factors: FactorSet) -> dict[str, Any]:
    return {
        "method": factors.method,
        "long_factor": list(factors.long_factor),
        "short_factor": list(factors.short_factor) if factors.short_factor is not None else None,
        "start_tokens": factors.start_tokens,
        "attention": factors.attention,
        "target_length": factors.target_length,
    }


def _digest(data: Any) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- perplexity


@torch.no_grad()
def sliding_nll(model: Any, tokens: torch.Tensor, length: int, stride: int, chunk: int = 1024) -> tuple[float, int]:
    """(sum of NLL, scored tokens) of one token sequence read by windows of `length` moving by `stride`.

    Standard sliding-window perplexity: every window has `length` tokens (the last one is aligned to the
    end of the sequence); only the tokens no earlier window scored are counted, so each token after the
    first is predicted exactly once, with at least `length - stride` tokens of context before it. The
    stride is capped at `length - 1`: with no overlap a window's first token would never be predicted.
    """
    n = int(tokens.shape[-1])
    if n < 2:
        return 0.0, 0
    length = min(length, n)
    # Windows must overlap by at least one token: a window's first token has no context inside it.
    stride = max(1, min(stride, length - 1))
    starts = list(range(0, n - length + 1, stride))
    if starts[-1] + length < n:
        starts.append(n - length)
    device = next(model.parameters()).device
    total, count, scored_until = 0.0, 0, 1  # position 0 (BOS) is never predicted
    for start in starts:
        ids = tokens[start:start + length].view(1, -1).to(device)
        labels = shift_labels(ids)  # labels[:, t] is the token at start + t + 1
        already = scored_until - start - 1
        if already > 0:
            labels[:, :already] = -100
        with chunked_mlps(model, chunk):
            hidden = decoder_of(model)(input_ids=ids, use_cache=False).last_hidden_state
        nll, scored = chunked_nll(model, hidden, labels, chunk=chunk)
        total += float(nll)
        count += int(scored)
        scored_until = start + length
    return total, count


def score_sliding(model: Any, spans: torch.Tensor, length: int, stride: int, chunk: int = 1024,
                  progress: bool = False, desc: str = "perplexity") -> dict[str, Any]:
    """Token-weighted sliding-window perplexity of each row of `spans`."""
    from tqdm.auto import tqdm

    total, tokens, per_window = 0.0, 0, []
    for row in tqdm(list(spans.unbind(0)), desc=desc, leave=False, disable=not progress):
        nll, count = sliding_nll(model, row, length, stride, chunk)
        total += nll
        tokens += count
        per_window.append(math.exp(nll / max(count, 1)) if nll / max(count, 1) < 700 else math.inf)
    mean = total / max(tokens, 1)
    return {"perplexity": math.exp(mean) if mean < 700 else math.inf, "nll": mean, "tokens": tokens,
            "per_window": per_window}


# --------------------------------------------------------------------------- cells


class CellStore:
    """Finished cells on disk, one JSON file each, reused on resume only if their fingerprint matches."""

    def __init__(self, out_dir: Path, resume: bool) -> None:
        self.dir = out_dir / CELLS_DIR
        if not resume and self.dir.is_dir():
            for old in self.dir.glob("*.json"):
                old.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.reused = 0
        self.computed = 0

    def path(self, kind: str, label: str, length: int) -> Path:
        return self.dir / f"{kind}__{_slug(label)}__{length}.json"

    def get(self, kind: str, label: str, length: int, fingerprint: str) -> dict[str, Any] | None:
        path = self.path(kind, label, length)
        if not path.is_file():
            return None
        try:
            cell = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # a cell is written atomically, but a hand-edited one is simply recomputed
        if cell.get("fingerprint") != fingerprint:
            log.warning("%s: settings changed since it was scored; recomputing", path.name)
            return None
        self.reused += 1
        return cell

    def put(self, kind: str, label: str, length: int, cell: dict[str, Any]) -> None:
        atomic_write_json(self.path(kind, label, length), cell)
        self.computed += 1


def _json_number(value: float) -> float | str:
    """JSON has no infinity: a diverged perplexity is written as the string "inf"."""
    return value if math.isfinite(value) else "inf"


# --------------------------------------------------------------------------- the run


def _check_passkey_settings(recipe: Recipe, tokenizer: Any) -> None:
    from longrope_cli.evaluate.passkey import build_passkey_prompt

    cfg = recipe.eval
    bad = [d for d in cfg.passkey_depths if not 0.0 <= d <= 1.0]
    if bad:
        raise RecipeError(f"eval.passkey_depths: {bad[0]} is outside [0, 1] (0 = start of the filler, 1 = end)")
    if cfg.passkey_lengths and cfg.passkey_trials < 1:
        raise RecipeError(f"eval.passkey_trials must be >= 1, got {cfg.passkey_trials}")
    for length in cfg.passkey_lengths:
        try:
            build_passkey_prompt(tokenizer, length, 0.0, 10000)
        except ValueError as err:
            raise RecipeError(f"eval.passkey_lengths: {err}") from None


def _windows_for(recipe: Recipe, token_docs: list, bos: int | None, length: int) -> tuple[torch.Tensor, int, int]:
    """(windows or sliding spans, stride, span) for one length; the same for every method."""
    cfg = recipe.eval
    if cfg.mode == "truncate":
        windows = make_windows(token_docs, length, cfg.documents, bos, recipe.data.windows_per_doc, "eval")
        return windows, length, length
    if cfg.mode == "same-text":
        longest = max(cfg.lengths)
        spans = make_windows(token_docs, longest, cfg.documents, bos, recipe.data.windows_per_doc, "eval")
        return split_windows(spans, length, bos), length, longest
    stride = max(1, min(cfg.stride or length // 2, length - 1))
    span = max(cfg.sliding_tokens or 4 * length, length)
    spans = make_windows(token_docs, span, cfg.documents, bos, recipe.data.windows_per_doc, "eval")
    return spans, stride, span


def run_eval(recipe: Recipe, out_dir: Path, *, resume: bool = False, lm: LoadedModel | None = None,
             progress: bool = True) -> Path:
    """Score every (method, length) cell of `recipe.eval`, write `out_dir/results.json` and the plots.

    With `resume`, cells already in `out_dir/cells/` with the same fingerprint are not recomputed.
    A model passed as `lm` is left with the factors it had. Returns the path of results.json.

    Example:
        >>> run_eval(load_recipe(flags={"eval.lengths": "256,512", "eval.documents": 2}), Path("runs/eval"))
        ... # doctest: +SKIP
    """
    cfg = recipe.eval
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.lengths:
        raise RecipeError("eval.lengths is empty; pass e.g. --lengths 4k,8k,16k")
    if cfg.documents < 1:
        raise RecipeError(f"eval.documents must be >= 1, got {cfg.documents}")
    check_method_names(cfg.methods)
    (out_dir / COMPLETE_MARKER).unlink(missing_ok=True)  # this run is not complete until it says so again
    if lm is None:
        m = recipe.model
        lm = load_model(m.name, dtype=m.dtype, device=m.device, attn_implementation=m.attn_implementation,
                        original_length=m.original_length, trust_remote_code=m.trust_remote_code)
    layout = lm.layout
    native = native_factors(lm.model, layout)  # None for plain RoPE: baselines relative to theta_i as always
    methods = [dataclasses.replace(m, native=native) if m.kind == "baseline" else m
               for m in resolve_methods(cfg.methods, layout)]
    _check_passkey_settings(recipe, lm.tokenizer)
    lengths = sorted(set(cfg.lengths))
    passkey_lengths = sorted(set(cfg.passkey_lengths))

    corpus = load_corpus(recipe.data.corpus, recipe.data.text_field, recipe.data.search_fraction,
                         recipe.data.eval_fraction)
    eval_docs = corpus.split("eval")
    token_docs = tokenize_documents(eval_docs, lm.tokenizer, recipe.data.cache_dir)
    bos = lm.tokenizer.bos_token_id
    windows = {n: _windows_for(recipe, token_docs, bos, n) for n in lengths}  # fail on a short corpus up front

    model_info = {"name": lm.name, "path": str(lm.path), "layout": layout.to_dict(),
                  "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""), "device": str(lm.device)}
    provenance = {
        "environment": environment_info(),
        "recipe": recipe_to_dict(recipe),
        "model": model_info,
        "data": {
            "corpus": recipe.data.corpus, "split": "eval", "documents": [d.id for d in eval_docs],
            "document_tokens": [int(len(t)) for t in token_docs], "mode": cfg.mode,
            "windows": {format_length(n): {"count": int(w.shape[0]), "tokens": int(w.shape[1]), "stride": s,
                                           "sha1": hashlib.sha1(w.numpy().tobytes()).hexdigest()[:16]}
                        for n, (w, s, _) in windows.items()},
        },
    }
    base_key = {"model": {k: model_info[k] for k in ("name", "layout", "dtype")}, "chunk": recipe.model.loss_chunk}
    store = CellStore(out_dir, resume)
    results_path = out_dir / "results.json"
    previous = installed_factors(lm.model)
    ppl_cells: list[dict[str, Any]] = []
    passkey_cells: list[dict[str, Any]] = []

    def write_results(complete: bool) -> None:
        atomic_write_json(results_path, _results_document(provenance, methods, layout, lengths, passkey_lengths,
                                                          ppl_cells, passkey_cells, complete))

    def cell(kind: str, method: EvalMethod, length: int, key: dict[str, Any],
             compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        fingerprint = _digest({**base_key, **key})
        found = store.get(kind, method.label, length, fingerprint)
        if found is not None:
            return found
        factors = method.factors_at(layout, length)
        install_factors(lm.model, factors, layout)
        started = time.perf_counter()
        body = compute()
        done = {"kind": kind, "method": method.label, "length": length, **body,
                "seconds": round(time.perf_counter() - started, 3), "fingerprint": fingerprint}
        store.put(kind, method.label, length, done)
        return done

    try:
        for length in lengths:
            rows, stride, span = windows[length]
            window_sha = provenance["data"]["windows"][format_length(length)]["sha1"]
            for method in methods:
                key = {"factors": _factor_summary(method.factors_at(layout, length)), "windows": window_sha,
                       "mode": cfg.mode, "stride": stride, "span": span}
                desc = f"{method.label} @ {format_length(length)}"

                def compute_ppl(rows=rows, stride=stride, length=length, desc=desc) -> dict[str, Any]:
                    if cfg.mode == "sliding":
                        scored = score_sliding(lm.model, rows, length, stride, recipe.model.loss_chunk, progress, desc)
                    else:
                        if progress:
                            log.info("perplexity %s (%d windows)", desc, rows.shape[0])
                        result = score_perplexity(lm.model, rows, chunk=recipe.model.loss_chunk, progress=progress)
                        scored = dataclasses.asdict(result)
                    return {"perplexity": _json_number(scored["perplexity"]), "nll": _json_number(scored["nll"]),
                            "tokens": scored["tokens"], "windows": int(rows.shape[0]),
                            "per_window": [_json_number(p) for p in scored["per_window"]]}

                done = cell("perplexity", method, length, key, compute_ppl)
                ppl_cells.append(done)
                log.info("%-14s %6s  ppl %s  (%s tokens, %.1f s)", method.label, format_length(length),
                         _fmt(done["perplexity"]), done["tokens"], done["seconds"])
                write_results(False)
        for length in passkey_lengths:
            for method in methods:
                key = {"factors": _factor_summary(method.factors_at(layout, length)), "depths": cfg.passkey_depths,
                       "trials": cfg.passkey_trials, "seed": cfg.seed}

                def compute_passkey(length=length) -> dict[str, Any]:
                    from longrope_cli.evaluate.passkey import score_passkey

                    results = score_passkey(lm.model, lm.tokenizer, [length], cfg.passkey_depths, cfg.passkey_trials,
                                            seed=cfg.seed, progress=progress)
                    return {"depths": [{"depth": r.depth, "trials": r.trials, "correct": r.correct,
                                        "accuracy": r.accuracy} for r in results]}

                done = cell("passkey", method, length, key, compute_passkey)
                passkey_cells.append(done)
                accuracy = sum(d["correct"] for d in done["depths"]) / max(1, sum(d["trials"] for d in done["depths"]))
                log.info("%-14s %6s  passkey %.0f%%  (%.1f s)", method.label, format_length(length), 100 * accuracy,
                         done["seconds"])
                write_results(False)
    finally:
        if previous is not None:
            install_factors(lm.model, previous, layout)
        else:
            remove_factors(lm.model)

    write_results(True)
    if cfg.plots:
        from longrope_cli.report import write_plots

        results = json.loads(results_path.read_text(encoding="utf-8"))
        for path in write_plots(results, out_dir):
            log.info("wrote %s", path)
    log.info("%d cells computed, %d reused from an earlier run", store.computed, store.reused)
    mark_complete(out_dir, "eval", results_path, cells=store.computed + store.reused, reused=store.reused)
    return results_path


def _fmt(value: float | str) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) else str(value)


def _results_document(provenance: dict[str, Any], methods: list[EvalMethod], layout: RopeLayout, lengths: list[int],
                      passkey_lengths: list[int], ppl_cells: list[dict[str, Any]],
                      passkey_cells: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
    """The results.json document: provenance, methods with their factors, and one entry per cell."""
    largest = max(lengths + passkey_lengths)
    method_rows = []
    for method in methods:
        factors = method.factors_at(layout, largest)
        method_rows.append({"label": method.label, "kind": method.kind, "source": method.source,
                            "factors_at": largest, "factors": _factor_summary(factors)})
    strip = ("fingerprint", "kind")
    passkey = []
    for c in passkey_cells:
        for d in c["depths"]:
            passkey.append({"method": c["method"], "length": c["length"], **d})
    return {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "complete": complete,
        "provenance": provenance,
        "original_length": layout.original_length,
        "lengths": lengths,
        "passkey_lengths": passkey_lengths,
        "methods": method_rows,
        "perplexity": [{k: v for k, v in c.items() if k not in strip} for c in ppl_cells],
        "passkey": passkey,
        "passkey_seconds": [{"method": c["method"], "length": c["length"], "seconds": c["seconds"]}
                            for c in passkey_cells],
    }


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results.json written by `run_eval` (a folder holding one is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LongRopeError(f"cannot read eval results {str(path)!r}: {err}") from None
    if data.get("format") != RESULTS_FORMAT:
        raise LongRopeError(f"{path}: not a longrope eval results file (format {data.get('format')!r})")
    return data

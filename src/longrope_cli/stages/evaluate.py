"""`longrope eval`: perplexity across lengths and passkey retrieval for several methods, resumable per cell.

A *method* is a baseline name (none, pi, ntk, dynamic-ntk, yarn; its factor set is generated for each
length, so dynamic NTK really is dynamic) or a factor file (its long/short pair switches at the original
window inside the rotary module, as transformers does). Every method scores the same eval-split windows.

Work is split into cells (`evaluate.cells`), one per (method, length) and kind (perplexity, passkey);
`resume=True` reuses every finished cell whose fingerprint still matches, so a crashed eval restarts where
it stopped. `results.json` (`evaluate.results`) is rewritten after every cell and `complete.json` last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from longrope_cli.data import load_corpus, make_windows, split_windows, tokenize_documents
from longrope_cli.errors import RecipeError
from longrope_cli.evaluate.cells import CellStore
from longrope_cli.evaluate.methods import EvalMethod, check_method_names, factor_summary, resolve_methods
from longrope_cli.evaluate.perplexity import score_perplexity
from longrope_cli.evaluate.results import RESULTS_FILE, results_document
from longrope_cli.evaluate.sliding import score_sliding
from longrope_cli.lengths import format_length
from longrope_cli.models import LoadedModel, load_recipe_model
from longrope_cli.numbers import digest, json_number
from longrope_cli.outputs import atomic_write_json, environment_info
from longrope_cli.recipe import Recipe, recipe_to_dict
from longrope_cli.rope.native import native_factors
from longrope_cli.rope.rotary import install_factors, installed_factors, remove_factors
from longrope_cli.stages.folder import StageResult, stage_folder

log = logging.getLogger(__name__)


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
             progress: bool = True, scorer: Callable[..., Any] = score_perplexity) -> StageResult:
    """Score every (method, length) cell of `recipe.eval`, write `out_dir/results.json` and the plots.

    With `resume`, cells already in `out_dir/cells/` with the same fingerprint are not recomputed.
    A model passed as `lm` is left with the factors it had. The artifact is results.json. `scorer`: the
    perplexity of a batch of windows (`evaluate.perplexity.score_perplexity`; a wrapper may count or fail).

    Example:
        >>> run_eval(load_recipe(flags={"eval.lengths": "256,512", "eval.documents": 2}), Path("runs/eval"))
        ... # doctest: +SKIP
    """
    if not recipe.eval.lengths:
        raise RecipeError("eval.lengths is empty; pass e.g. --lengths 4k,8k,16k")
    check_method_names(recipe.eval.methods)
    with stage_folder("eval", recipe, out_dir) as folder:
        run = EvalRun(recipe, lm or load_recipe_model(recipe.model), Path(out_dir), resume, progress, scorer)
        folder.open()  # after every check (methods, factor files, windows): a refused eval leaves OUT as it was
        run.store = CellStore(Path(out_dir), resume)
        previous = installed_factors(run.lm.model)
        try:
            run.perplexity_cells()
            run.passkey_cells()
        finally:
            if previous is not None:
                install_factors(run.lm.model, previous, run.lm.layout)
            else:
                remove_factors(run.lm.model)
        run.write_results(True)
        run.write_plots()
        log.info("%d cells computed, %d reused from an earlier run", run.store.computed, run.store.reused)
        return folder.complete(run.results_path, cells=run.store.computed + run.store.reused,
                               reused=run.store.reused)


class EvalRun:
    """One eval: the methods, the windows of every length (the same for every method) and the cells."""

    def __init__(self, recipe: Recipe, lm: LoadedModel, out_dir: Path, resume: bool, progress: bool,
                 scorer: Callable[..., Any] = score_perplexity) -> None:
        self.recipe, self.cfg, self.lm, self.progress, self.scorer = recipe, recipe.eval, lm, progress, scorer
        layout = lm.layout
        native = native_factors(lm.model, layout)  # None for plain RoPE: baselines relative to theta_i as always
        self.methods = [dataclasses.replace(m, native=native) if m.kind == "baseline" else m
                        for m in resolve_methods(self.cfg.methods, layout)]
        _check_passkey_settings(recipe, lm.tokenizer)
        self.lengths = sorted(set(self.cfg.lengths))
        self.passkey_lengths = sorted(set(self.cfg.passkey_lengths))
        data = recipe.data
        corpus = load_corpus(data.corpus, data.text_field, data.search_fraction, data.eval_fraction)
        eval_docs = corpus.split("eval")
        token_docs = tokenize_documents(eval_docs, lm.tokenizer, data.cache_dir)
        bos = lm.tokenizer.bos_token_id
        # every length's windows up front: a corpus too short for one fails before any scoring
        self.windows = {n: _windows_for(recipe, token_docs, bos, n) for n in self.lengths}
        model_info = {"name": lm.name, "path": str(lm.path), "layout": layout.to_dict(),
                      "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""), "device": str(lm.device)}
        self.window_sha = {n: hashlib.sha1(w.numpy().tobytes()).hexdigest()[:16]
                           for n, (w, _, _) in self.windows.items()}
        self.provenance = {
            "environment": environment_info(),
            "recipe": recipe_to_dict(recipe),
            "model": model_info,
            "data": {
                "corpus": data.corpus, "split": "eval", "documents": [d.id for d in eval_docs],
                "document_tokens": [int(len(t)) for t in token_docs], "mode": self.cfg.mode,
                "windows": {format_length(n): {"count": int(w.shape[0]), "tokens": int(w.shape[1]), "stride": s,
                                               "sha1": self.window_sha[n]}
                            for n, (w, s, _) in self.windows.items()},
            },
        }
        self.base_key = {"model": {k: model_info[k] for k in ("name", "layout", "dtype")},
                         "chunk": recipe.model.loss_chunk}
        self.store: CellStore | None = None  # opened with the folder
        self.out_dir = out_dir
        self.results_path = out_dir / RESULTS_FILE
        self.ppl_cells: list[dict[str, Any]] = []
        self.passkey_results: list[dict[str, Any]] = []

    def write_results(self, complete: bool) -> None:
        atomic_write_json(self.results_path, results_document(
            self.provenance, self.methods, self.lm.layout, self.lengths, self.passkey_lengths, self.ppl_cells,
            self.passkey_results, complete))

    def write_plots(self) -> None:
        if self.cfg.plots:
            from longrope_cli.report import write_plots

            for path in write_plots(json.loads(self.results_path.read_text(encoding="utf-8")), self.out_dir):
                log.info("wrote %s", path)

    def cell(self, kind: str, method: EvalMethod, length: int, key: dict[str, Any],
             compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A finished cell from the store, or computed now with the method's factors installed."""
        fingerprint = digest({**self.base_key, **key})
        found = self.store.get(kind, method.label, length, fingerprint)
        if found is not None:
            return found
        install_factors(self.lm.model, method.factors_at(self.lm.layout, length), self.lm.layout)
        started = time.perf_counter()
        body = compute()
        done = {"kind": kind, "method": method.label, "length": length, **body,
                "seconds": round(time.perf_counter() - started, 3), "fingerprint": fingerprint}
        self.store.put(kind, method.label, length, done)
        return done

    def perplexity_cells(self) -> None:
        for length in self.lengths:
            rows, stride, span = self.windows[length]
            for method in self.methods:
                key = {"factors": factor_summary(method.factors_at(self.lm.layout, length)),
                       "windows": self.window_sha[length], "mode": self.cfg.mode, "stride": stride, "span": span}
                desc = f"{method.label} @ {format_length(length)}"
                done = self.cell("perplexity", method, length, key,
                                 lambda rows=rows, stride=stride, length=length, desc=desc:
                                 self._perplexity(rows, length, stride, desc))
                self.ppl_cells.append(done)
                log.info("%-14s %6s  ppl %s  (%s tokens, %.1f s)", method.label, format_length(length),
                         _fmt(done["perplexity"]), done["tokens"], done["seconds"])
                self.write_results(False)

    def _perplexity(self, rows: torch.Tensor, length: int, stride: int, desc: str) -> dict[str, Any]:
        chunk, scoring = self.recipe.model.loss_chunk, self.recipe.model.scoring
        if self.cfg.mode == "sliding":
            scored = score_sliding(self.lm.model, rows, length, stride, chunk, self.progress, desc, scoring)
        else:
            if self.progress:
                log.info("perplexity %s (%d windows)", desc, rows.shape[0])
            scored = dataclasses.asdict(self.scorer(self.lm.model, rows, chunk=chunk, progress=self.progress,
                                                    scoring=scoring))
        return {"perplexity": json_number(scored["perplexity"]), "nll": json_number(scored["nll"]),
                "tokens": scored["tokens"], "windows": int(rows.shape[0]),
                "per_window": [json_number(p) for p in scored["per_window"]]}

    def passkey_cells(self) -> None:
        cfg = self.cfg
        for length in self.passkey_lengths:
            for method in self.methods:
                key = {"factors": factor_summary(method.factors_at(self.lm.layout, length)),
                       "depths": cfg.passkey_depths, "trials": cfg.passkey_trials, "seed": cfg.seed}
                done = self.cell("passkey", method, length, key, lambda length=length: self._passkey(length))
                self.passkey_results.append(done)
                depths = done["depths"]
                accuracy = sum(d["correct"] for d in depths) / max(1, sum(d["trials"] for d in depths))
                log.info("%-14s %6s  passkey %.0f%%  (%.1f s)", method.label, format_length(length), 100 * accuracy,
                         done["seconds"])
                self.write_results(False)

    def _passkey(self, length: int) -> dict[str, Any]:
        from longrope_cli.evaluate.passkey import score_passkey

        cfg = self.cfg
        results = score_passkey(self.lm.model, self.lm.tokenizer, [length], cfg.passkey_depths, cfg.passkey_trials,
                                seed=cfg.seed, progress=self.progress)
        return {"depths": [{"depth": r.depth, "trials": r.trials, "correct": r.correct, "accuracy": r.accuracy}
                           for r in results]}


def _fmt(value: float | str) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) else str(value)

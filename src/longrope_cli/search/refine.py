"""What the search does after the evolution: re-rank on fresh windows, then tune the attention temperature.

- Validation re-ranking (`search.validate_top`): the best of ~1,300 candidates on 5 windows is an optimistic
  estimate of itself (winner's curse). The top k are scored again on search-split windows that the evolution
  never saw, and the best there is handed on.
- Attention search (`search.attention_search`, LongRoPE2's second stage): with the factors frozen, the
  attention factor that multiplies cos and sin is searched by golden section on [1, 2a - 1] around the
  factor `a` the evolution used (su by default), on every search window available.

Both score with their own evaluator and keep each score in `refine.json` (rewritten atomically after every
score, under a fingerprint of the windows), so a run killed here resumes without scoring anything twice.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from longrope_cli.numbers import json_number, read_number
from longrope_cli.outputs import atomic_write_json
from longrope_cli.rope.factors import FactorSet
from longrope_cli.search.evaluator import Evaluator
from longrope_cli.search.evolution import Candidate

log = logging.getLogger(__name__)

REFINE_FILE = "refine.json"
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
ATTENTION_STEP = 1e-4  # LongRoPE2's grid for the temperature


class ScoreBook:
    """Scores keyed by a string, persisted atomically after each one; ignored when the fingerprint differs.
    `path` None: kept in memory only (ranks other than 0)."""

    def __init__(self, path: Path | None, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path) if path is not None else None
        self.fingerprint = fingerprint
        self.scores: dict[str, float] = {}
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                data = {}
            if data.get("fingerprint") == fingerprint:
                self.scores = {k: read_number(v) for k, v in data.get("scores", {}).items()}

    def score(self, key: str, compute: Callable[[], float]) -> float:
        if key not in self.scores:
            value = float(compute())
            self.scores[key] = value if math.isfinite(value) else math.inf
            if self.path is not None:
                atomic_write_json(self.path, {"fingerprint": self.fingerprint, "scores": self.scores})
        return self.scores[key]


def validate_top(candidates: Sequence[Candidate], to_factors: Callable[[Candidate], FactorSet],
                 evaluator: Evaluator, book: ScoreBook) -> tuple[Candidate, float, list[dict[str, Any]]]:
    """The candidate with the lowest perplexity on the fresh windows (ties: the evolution's order), that
    perplexity, and a record per candidate for the provenance."""
    keys = ["validate " + json.dumps(c.to_json()) for c in candidates]
    missing = [k for k, key in enumerate(keys) if key not in book.scores]
    batch = max(1, int(getattr(evaluator, "parallelism", 1)))  # one candidate per rank at a time
    for start in range(0, len(missing), batch):
        part = missing[start:start + batch]
        for k, fit in zip(part, evaluator.evaluate([to_factors(candidates[k]) for k in part]), strict=True):
            book.score(keys[k], lambda f=fit: f)
    rows = []
    for rank, key in enumerate(keys):
        value = book.scores[key]
        rows.append({"rank": rank, "fresh_perplexity": json_number(value)})
        log.info("validation: evolution rank %d: %.4f on fresh windows", rank, value)
    best = min(range(len(candidates)), key=lambda k: (book.scores[keys[k]], k))
    return candidates[best], book.scores[keys[best]], rows


def search_attention(factors: FactorSet, evaluator: Evaluator, book: ScoreBook, evaluations: int
                     ) -> tuple[FactorSet, list[dict[str, float]]]:
    """Golden-section search of the attention factor on [1, 2a - 1] (a: the factor in use), `evaluations`
    scores in all (the starting factor included); the best scored value wins."""
    start = round(float(factors.attention), 4)
    if start <= 1.0 or evaluations < 2:
        return factors, []

    def score(value: float) -> float:
        value = round(value / ATTENTION_STEP) * ATTENTION_STEP
        key = f"attention {value:.4f} " + json.dumps([list(factors.long_factor), factors.start_tokens])
        return book.score(key, lambda: evaluator.evaluate([replace(factors, attention=value)])[0])

    tried: dict[float, float] = {start: score(start)}
    lo, hi = 1.0, 2.0 * start - 1.0
    x1, x2 = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
    f1, f2 = score(x1), score(x2)
    tried[round(x1, 4)], tried[round(x2, 4)] = f1, f2
    while len(tried) < evaluations and hi - lo > 2 * ATTENTION_STEP:
        if f1 <= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - GOLDEN * (hi - lo)
            f1 = tried[round(x1, 4)] = score(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + GOLDEN * (hi - lo)
            f2 = tried[round(x2, 4)] = score(x2)
    best = min(sorted(tried), key=lambda v: (tried[v], abs(v - start)))
    log.info("attention search: %.4f -> %.4f (perplexity %.4f -> %.4f, %d evaluations)", start, best,
             tried[start], tried[best], len(tried))
    trace = [{"attention": v, "perplexity": tried[v]} for v in sorted(tried)]
    chosen = factors if best == start else replace(factors, attention=best, attention_policy="searched")
    return chosen, trace

"""Perplexity of fixed-length windows: one forward each, no KV cache, loss in chunks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from longrope_cli.losses import chunked_nll, decoder_of, shift_labels
from longrope_cli.numbers import perplexity_from_nll
from longrope_cli.seqchunk import chunked_mlps


@dataclass
class PerplexityResult:
    """Token-weighted perplexity over windows, plus each window's own perplexity."""

    perplexity: float
    nll: float
    tokens: int
    per_window: list[float]

    @property
    def finite(self) -> bool:
        return math.isfinite(self.perplexity)


@torch.no_grad()
def window_nll(model: Any, input_ids: torch.Tensor, chunk: int = 1024,
               labels: torch.Tensor | None = None, mlp_chunk: int | None = None) -> tuple[float, int]:
    """(sum of NLL, scored tokens) for a batch of windows (B, L); `labels` (already shifted, -100 = not scored)
    restrict the loss to some tokens, e.g. a needle's answer. The decoder MLPs run `mlp_chunk` positions at a
    time (default: `chunk`; 0: whole sequence)."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    labels = shift_labels(input_ids) if labels is None else labels.to(device)
    with chunked_mlps(model, chunk if mlp_chunk is None else mlp_chunk):  # no L x intermediate tensor
        hidden = decoder_of(model)(input_ids=input_ids, use_cache=False).last_hidden_state
    total, count = chunked_nll(model, hidden, labels, chunk=chunk)
    return float(total), int(count)


def score_perplexity(
    model: Any,
    windows: torch.Tensor | Sequence[torch.Tensor],
    chunk: int = 1024,
    progress: bool = False,
    labels: torch.Tensor | None = None,
) -> PerplexityResult:
    """Perplexity of `windows` (N, L) under the model as it is (install factors first).

    NaN/inf never raises: the result is simply infinite. `labels` (N, L): per-window targets (-100 = not
    scored), e.g. only a needle's answer.

    Example:
        >>> score_perplexity(lm.model, windows).perplexity  # doctest: +SKIP
        41.7
    """
    total, tokens, per_window = 0.0, 0, []
    rows = list(windows) if not isinstance(windows, torch.Tensor) else list(windows.unbind(0))
    for k, row in enumerate(tqdm(rows, desc="perplexity", leave=False, disable=not progress)):
        nll, count = window_nll(model, row.view(1, -1), chunk=chunk,
                                labels=None if labels is None else labels[k].view(1, -1))
        if not math.isfinite(nll):
            return PerplexityResult(math.inf, math.inf, tokens + count, per_window + [math.inf])
        total += nll
        tokens += count
        per_window.append(perplexity_from_nll(nll / max(count, 1)))
    mean = total / max(tokens, 1)
    return PerplexityResult(perplexity_from_nll(mean), mean, tokens, per_window)

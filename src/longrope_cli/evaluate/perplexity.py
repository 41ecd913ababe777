"""Perplexity of fixed-length windows: one forward each, no KV cache, loss in chunks."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from longrope_cli.losses import chunked_nll, decoder_of, shift_labels
from longrope_cli.numbers import perplexity_from_nll
from longrope_cli.seqchunk import chunked_mlps

log = logging.getLogger(__name__)


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


SCORING_MODES = ("auto", "layerwise", "standard")
LAYERWISE_FROM = 32 * 1024  # `auto` scores windows this long or longer layer by layer


@torch.no_grad()
def decoder_hidden(model: Any, input_ids: torch.Tensor, chunk: int = 1024, scoring: str = "auto",
                   mlp_chunk: int | None = None) -> torch.Tensor:
    """The decoder's last hidden states for scoring. `layerwise` (`longrope_cli.layerwise`: weights + a few
    L x hidden tensors) or `standard` (the model's own forward with its MLPs over `chunk` positions at a time);
    `auto`: layerwise from 32k tokens on where the architecture allows it."""
    from longrope_cli import layerwise

    length = input_ids.shape[-1]
    if scoring == "layerwise" or (scoring == "auto" and length >= LAYERWISE_FROM):
        why = layerwise.unsupported(model, length)
        if why is None:
            return layerwise.layerwise_hidden(model, input_ids, chunk=chunk)
        if scoring == "layerwise":
            log.warning("layer-by-layer scoring is not available for this model (%s): the standard forward", why)
    with chunked_mlps(model, chunk if mlp_chunk is None else mlp_chunk):  # no L x intermediate tensor
        return decoder_of(model)(input_ids=input_ids, use_cache=False).last_hidden_state


@torch.no_grad()
def window_nll(model: Any, input_ids: torch.Tensor, chunk: int = 1024,
               labels: torch.Tensor | None = None, mlp_chunk: int | None = None,
               scoring: str = "auto", context: Any = None) -> tuple[float, int]:
    """(sum of NLL, scored tokens) for a batch of windows (B, L); `labels` (already shifted, -100 = not scored)
    restrict the loss to some tokens, e.g. a needle's answer. The decoder MLPs run `mlp_chunk` positions at a
    time (default: `chunk`; 0: whole sequence); `scoring` as in `decoder_hidden`. `context`: a
    `context_parallel.ContextGroup` whose ranks score the windows together (layer by layer)."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    labels = shift_labels(input_ids) if labels is None else labels.to(device)
    if context is not None:
        from longrope_cli import context_parallel

        return context_parallel.window_nll(model, input_ids, labels, context, chunk=chunk)
    hidden = decoder_hidden(model, input_ids, chunk, scoring, mlp_chunk)
    total, count = chunked_nll(model, hidden, labels, chunk=chunk)
    return float(total), int(count)


def score_perplexity(
    model: Any,
    windows: torch.Tensor | Sequence[torch.Tensor],
    chunk: int = 1024,
    progress: bool = False,
    labels: torch.Tensor | None = None,
    scoring: str = "auto",
    context: Any = None,
) -> PerplexityResult:
    """Perplexity of `windows` (N, L) under the model as it is (install factors first).

    NaN/inf never raises: the result is simply infinite. `labels` (N, L): per-window targets (-100 = not
    scored), e.g. only a needle's answer. `context`: score each window with the ranks of a context-parallel
    group (`window_nll`).

    Example:
        >>> score_perplexity(lm.model, windows).perplexity  # doctest: +SKIP
        41.7
    """
    total, tokens, per_window = 0.0, 0, []
    rows = list(windows) if not isinstance(windows, torch.Tensor) else list(windows.unbind(0))
    for k, row in enumerate(tqdm(rows, desc="perplexity", leave=False, disable=not progress)):
        nll, count = window_nll(model, row.view(1, -1), chunk=chunk,
                                labels=None if labels is None else labels[k].view(1, -1), scoring=scoring,
                                context=context)
        if not math.isfinite(nll):
            return PerplexityResult(math.inf, math.inf, tokens + count, per_window + [math.inf])
        total += nll
        tokens += count
        per_window.append(perplexity_from_nll(nll / max(count, 1)))
    mean = total / max(tokens, 1)
    return PerplexityResult(perplexity_from_nll(mean), mean, tokens, per_window)

"""Sliding-window perplexity (`eval.mode=sliding`): every token predicted once, with a long context."""

from __future__ import annotations

from typing import Any

import torch

from longrope_cli.evaluate.perplexity import decoder_hidden
from longrope_cli.losses import chunked_nll, shift_labels
from longrope_cli.numbers import perplexity_from_nll


@torch.no_grad()
def sliding_nll(model: Any, tokens: torch.Tensor, length: int, stride: int, chunk: int = 1024,
                scoring: str = "auto") -> tuple[float, int]:
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
        hidden = decoder_hidden(model, ids, chunk, scoring)
        nll, scored = chunked_nll(model, hidden, labels, chunk=chunk)
        total += float(nll)
        count += int(scored)
        scored_until = start + length
    return total, count


def score_sliding(model: Any, spans: torch.Tensor, length: int, stride: int, chunk: int = 1024,
                  progress: bool = False, desc: str = "perplexity", scoring: str = "auto") -> dict[str, Any]:
    """Token-weighted sliding-window perplexity of each row of `spans`."""
    from tqdm.auto import tqdm

    total, tokens, per_window = 0.0, 0, []
    for row in tqdm(list(spans.unbind(0)), desc=desc, leave=False, disable=not progress):
        nll, count = sliding_nll(model, row, length, stride, chunk, scoring)
        total += nll
        tokens += count
        per_window.append(perplexity_from_nll(nll / max(count, 1)))
    mean = total / max(tokens, 1)
    return {"perplexity": perplexity_from_nll(mean), "nll": mean, "tokens": tokens,
            "per_window": per_window}


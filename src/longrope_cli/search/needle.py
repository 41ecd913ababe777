"""LongRoPE2's needle-driven fitness (`search.fitness: needle`).

All-token perplexity is dominated by tokens that need only local context, so it barely sees whether a
factor set keeps long-range retrieval. LongRoPE2 instead plants a 7-digit number at a stratified random depth
of each long search document, asks for it at the end, and scores only the answer tokens: the fitness is
exp(mean NLL over the answer tokens). The documents are the same search-split windows the perplexity fitness
would score; each keeps its length (the needle and question replace text, they do not extend the window).
"""

from __future__ import annotations

import random

import torch

from longrope_cli.errors import DataError
from longrope_cli.evaluate.passkey import _piece_ids

NEEDLE_DIGITS = 7


def needle_sentence(key: int) -> str:
    return f"The special magic number is {key}. Remember it. {key} is the special magic number."


QUESTION = "What is the special magic number? The special magic number is"


def needle_windows(windows: torch.Tensor, tokenizer, seed: int, stratum_offset: int = 0,
                   strata: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) of the same shape as `windows` (N, L, BOS first): window k carries a needle at a depth drawn
    uniformly in stratum k of `strata` (default N), the question at the end and the answer as its last tokens;
    labels are -100 except on the answer (labels[t] = ids[t + 1], the layout of `losses.chunked_nll`)."""
    n, length = windows.shape
    strata = strata or n
    rng = random.Random(f"needle:{seed}:{length}:{stratum_offset}")
    ids_out, labels_out = [], []
    question = _piece_ids(tokenizer, QUESTION)
    for k in range(n):
        key = rng.randint(10 ** (NEEDLE_DIGITS - 1), 10 ** NEEDLE_DIGITS - 1)
        needle = _piece_ids(tokenizer, needle_sentence(key))
        answer = _piece_ids(tokenizer, f"{key}.")
        row = windows[k].tolist()
        head, text = row[:1], row[1:]
        room = length - len(head) - len(needle) - len(question) - len(answer)
        if room < 1:
            raise DataError(f"a {length}-token window has no room for the needle prompt; use a longer target")
        text = text[:room]
        depth = ((k + stratum_offset) % strata + rng.random()) / strata
        at = round(depth * len(text))
        ids = head + text[:at] + needle + text[at:] + question + answer
        labels = [-100] * length
        first = length - len(answer)  # the answer's first token, predicted from the position before it
        for t in range(first, length):
            labels[t - 1] = ids[t]
        ids_out.append(ids)
        labels_out.append(labels)
    return torch.tensor(ids_out, dtype=torch.long), torch.tensor(labels_out, dtype=torch.long)

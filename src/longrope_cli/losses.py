"""Causal-LM loss computed in chunks from hidden states.

Full fp32 logits at 256k tokens x 32k vocab are 31 GiB. We run the decoder to its final hidden
states and project `chunk` positions at a time, so peak logits memory is chunk x vocab. In training
each chunk is checkpointed, so backward recomputes its logits instead of keeping them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def decoder_of(model: Any) -> Any:
    """The base transformer (without the LM head) of a *ForCausalLM model."""
    decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if decoder is None:
        raise TypeError(f"{type(model).__name__} has no base model attribute")
    return decoder


def _chunk_nll(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               softcap: float | None) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")


def chunked_nll(
    model: Any, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 1024, recompute: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token NLL and the number of scored tokens. `labels` are aligned with `hidden` (already
    shifted: labels[:, t] is the token predicted from position t; -100 = ignored)."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[1], chunk):
        h = hidden[:, start:start + chunk]
        y = labels[:, start:start + chunk]
        if recompute and torch.is_grad_enabled():
            total = total + checkpoint(_chunk_nll, h, y, head.weight, head.bias, softcap, use_reentrant=False)
        else:
            total = total + _chunk_nll(h, y, head.weight, head.bias, softcap)
    count = (labels != -100).sum()
    return total, count


def shift_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """labels[:, t] = input_ids[:, t + 1]; the last position predicts nothing."""
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    return labels

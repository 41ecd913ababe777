"""Per-token modules over slices of the sequence, so that their L x intermediate activations never exist at once.

A decoder layer's MLP acts on each position alone (gate/up projections, activation, down projection), so running
it `chunk` positions at a time gives the same result (to floating-point summation order) while its largest
tensors shrink from L x intermediate to chunk x intermediate: in a scoring forward of LLaMA2-7B that is
2 x 11008 floats per token, the largest activation there is. Attention still sees the whole sequence.

With `recompute` (fine-tuning) each slice runs under activation checkpointing of its own: backward recomputes
one slice's gate / up / activation at a time, instead of keeping them for the whole sequence while the
(already checkpointed) decoder layer is recomputed; the largest training activation shrinks the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from longrope_cli.losses import decoder_of


def decoder_mlps(model: Any) -> list[nn.Module]:
    """The `mlp` module of every decoder layer (Llama, Mistral, Qwen2, Phi-3, ... name it so); [] otherwise."""
    layers = getattr(decoder_of(model), "layers", None) or []
    return [layer.mlp for layer in layers if isinstance(getattr(layer, "mlp", None), nn.Module)]


def _chunked(forward: Any, chunk: int, recompute: bool = False) -> Any:
    def run(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        length = hidden.shape[-2] if hidden.dim() >= 2 else 0
        if length <= chunk:
            return forward(hidden, *args, **kwargs)
        if recompute and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            pieces = [checkpoint(forward, hidden[..., start:start + chunk, :], *args, use_reentrant=False, **kwargs)
                      for start in range(0, length, chunk)]
            return torch.cat(pieces, dim=-2)
        first = forward(hidden[..., :chunk, :], *args, **kwargs)
        out = first.new_empty((*hidden.shape[:-2], length, first.shape[-1]))
        out[..., :chunk, :] = first
        del first
        for start in range(chunk, length, chunk):
            out[..., start:start + chunk, :] = forward(hidden[..., start:start + chunk, :], *args, **kwargs)
        return out
    return run


def chunk_mlps(model: Any, chunk: int | None, recompute: bool = False) -> tuple[int, Any]:
    """Make every decoder MLP run `chunk` positions at a time (None or < 1: unchanged) until the returned undo
    is called; returns (how many MLPs, undo). `recompute`: each slice is checkpointed (training; it must stay
    installed through backward, when checkpointed layers run their forward again)."""
    mlps = decoder_mlps(model) if chunk and chunk > 0 else []
    saved = [mlp.__dict__.get("forward") for mlp in mlps]  # an instance forward someone else set, kept
    for mlp in mlps:
        mlp.forward = _chunked(mlp.forward, int(chunk), recompute)  # an instance attribute shadows the class's

    def undo() -> None:
        for mlp, previous in zip(mlps, saved, strict=True):
            if previous is None:
                del mlp.forward
            else:
                mlp.forward = previous

    return len(mlps), undo


@contextmanager
def chunked_mlps(model: Any, chunk: int | None) -> Iterator[int]:
    """Within the block, every decoder MLP runs `chunk` positions at a time (scoring, without gradients).
    Yields how many MLPs were wrapped."""
    count, undo = chunk_mlps(model, chunk)
    try:
        yield count
    finally:
        undo()

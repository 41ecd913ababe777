"""A scoring forward layer by layer: memory of weights + a few L x hidden tensors, at any length.

Only attention mixes positions. So, per decoder layer, everything else runs over slices of the sequence
(norms, the q / k / v / o projections, the MLP, the residual adds, in place), and attention runs over the whole
sequence through SDPA one group of heads at a time: q, k and v of all heads never exist at once. With the loss
computed from hidden states in chunks (`losses.chunked_nll`) there is no KV cache and no L x vocab tensor.
The result equals the model's own forward to floating-point summation order (tests compare them).

It serves the decoder layers transformers builds for Llama, Mistral (without a sliding window shorter than the
sequence), Qwen2 and Phi-3 (fused qkv_proj): `input_layernorm -> self_attn -> + -> post_attention_layernorm ->
mlp -> +`. `unsupported(model, length)` says why another model keeps the standard forward.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from longrope_cli.losses import decoder_of

log = logging.getLogger(__name__)

LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
LONG_FORWARD = 256 * 1024  # from this length on each layer logs a line: an hour-long forward stays visibly alive


def unsupported(model: Any, length: int) -> str | None:
    """Why the layer-by-layer forward cannot run `model` at `length` tokens, or None when it can."""
    try:
        decoder = decoder_of(model)
    except TypeError as err:
        return str(err)
    for part in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(decoder, part):
            return f"{type(decoder).__name__} has no {part}"
    config = model.config
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < length:
        return f"a sliding window of {window} tokens (shorter than {length})"
    if any(getattr(config, key, None) for key in ("final_logit_softcapping", "attn_logit_softcapping")):
        return "soft-capped attention"
    for layer in decoder.layers:
        missing = [p for p in LAYER_PARTS if not isinstance(getattr(layer, p, None), nn.Module)]
        extra = [n for n, _ in layer.named_children() if n not in LAYER_PARTS and "dropout" not in n]
        if missing or extra:
            return f"{type(layer).__name__} has {'no ' + missing[0] if missing else 'an extra ' + extra[0]}"
        attn = layer.self_attn
        if not (hasattr(attn, "o_proj") and (hasattr(attn, "qkv_proj") or hasattr(attn, "q_proj"))):
            return f"{type(attn).__name__} has no q/k/v/o projections"
        if any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
            return f"{type(attn).__name__} normalises q / k"
    return None


def _projections(attn: nn.Module, heads: int, kv_heads: int, d: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    """(weight, bias) of q, k and v, from separate projections or Phi-3's fused qkv_proj."""
    if hasattr(attn, "qkv_proj"):
        w, b = attn.qkv_proj.weight, attn.qkv_proj.bias
        cuts = (0, heads * d, heads * d + kv_heads * d, heads * d + 2 * kv_heads * d)
        return tuple((w[a:z], None if b is None else b[a:z]) for a, z in zip(cuts, cuts[1:], strict=False))
    return tuple((p.weight, p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj))


def _rows(weight_bias: tuple[torch.Tensor, torch.Tensor | None], first: int, last: int, d: int):
    weight, bias = weight_bias
    return weight[first * d:last * d], None if bias is None else bias[first * d:last * d]


def _rotary_chunk(rotary: nn.Module, hidden: torch.Tensor, start: int, stop: int, length: int):
    """cos / sin of positions start..stop-1 of a `length`-token sequence. The last position is appended and
    dropped: rotary modules that pick their tables by sequence length (longrope's short / long switch, dynamic
    NTK) read the whole sequence's, and no full-length table is ever built."""
    positions = torch.arange(start, stop, device=hidden.device)
    if stop < length:
        positions = torch.cat([positions, positions.new_tensor([length - 1])])
    cos, sin = rotary(hidden[:, start:stop], positions.unsqueeze(0))
    return cos[:, :stop - start], sin[:, :stop - start]


def _attention(layer: nn.Module, hidden: torch.Tensor, rotary: nn.Module, chunk: int, kv_group: int) -> torch.Tensor:
    """The attention block's output (before the residual add), `kv_group` key/value heads at a time."""
    attn, config = layer.self_attn, layer.self_attn.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    d, rep = attn.head_dim, heads // kv_heads
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the architecture's own (partial rotary too)
    wq, wk, wv = _projections(attn, heads, kv_heads, d)
    batch, length, _ = hidden.shape
    out = torch.zeros_like(hidden)
    for k0 in range(0, kv_heads, kv_group):
        k1 = min(kv_heads, k0 + kv_group)
        q_rows, k_rows, v_rows = _rows(wq, k0 * rep, k1 * rep, d), _rows(wk, k0, k1, d), _rows(wv, k0, k1, d)
        q = hidden.new_empty(batch, (k1 - k0) * rep, length, d)
        k = hidden.new_empty(batch, k1 - k0, length, d)
        v = torch.empty_like(k)
        for start in range(0, length, chunk):
            span = slice(start, start + chunk)
            x = layer.input_layernorm(hidden[:, span])
            q_c, k_c, v_c = (F.linear(x, w, b).view(batch, x.shape[1], -1, d).transpose(1, 2)
                             for w, b in (q_rows, k_rows, v_rows))
            # rotated a chunk at a time: no full-length copies of q, k, and no full-length cos / sin
            cos, sin = _rotary_chunk(rotary, hidden, start, min(start + chunk, length), length)
            q[:, :, span], k[:, :, span] = rope(q_c, k_c, cos, sin)
            v[:, :, span] = v_c
        if rep > 1:  # grouped-query attention: each kv head serves `rep` query heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling)
        del q, k, v
        w_o = attn.o_proj.weight[:, k0 * rep * d:k1 * rep * d]
        for start in range(0, length, chunk):
            span = slice(start, start + chunk)
            piece = o[:, :, span].transpose(1, 2).reshape(batch, -1, w_o.shape[1])
            out[:, span] += F.linear(piece, w_o)
        del o
    if attn.o_proj.bias is not None:
        out += attn.o_proj.bias
    return out


@torch.no_grad()
def layerwise_hidden(model: Any, input_ids: torch.Tensor, chunk: int = 1024, kv_group: int = 1) -> torch.Tensor:
    """The final hidden states (B, L, hidden) of the decoder, as `decoder(input_ids).last_hidden_state`, computed
    layer by layer: per-token work over `chunk` positions at a time, attention over `kv_group` kv heads at a time."""
    decoder = decoder_of(model)
    length = input_ids.shape[1]
    hidden = decoder.embed_tokens(input_ids)
    for index, layer in enumerate(decoder.layers):
        hidden += _attention(layer, hidden, decoder.rotary_emb, chunk, max(1, kv_group))
        for start in range(0, length, chunk):
            span = slice(start, start + chunk)
            hidden[:, span] += layer.mlp(layer.post_attention_layernorm(hidden[:, span]))
        if length >= LONG_FORWARD:
            log.info("scoring %d tokens: layer %d/%d done", length, index + 1, len(decoder.layers))
    for start in range(0, length, chunk):
        span = slice(start, start + chunk)
        hidden[:, span] = decoder.norm(hidden[:, span])
    return hidden

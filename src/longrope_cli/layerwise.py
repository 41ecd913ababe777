"""A scoring forward layer by layer: memory of weights + a few L x hidden tensors, at any length.

Only attention mixes positions. So, per decoder layer, everything else runs over slices of the sequence
(norms, the q / k / v / o projections, the MLP, the residual adds, in place), and attention runs over the whole
sequence one group of heads at a time: q, k and v of all heads never exist at once. On the GPU SDPA takes the
group's whole q, k, v (flash kernels); on the CPU the queries go a chunk at a time against the group's keys
(`_query_block`), which also keeps both threads busy. With the loss
computed from hidden states in chunks (`losses.chunked_nll`) there is no KV cache and no L x vocab tensor.
The result equals the model's own forward to floating-point summation order (tests compare them).

It serves the decoder layers transformers builds for Llama, Mistral (without a sliding window shorter than the
sequence), Qwen2 and Phi-3 (fused qkv_proj): `input_layernorm -> self_attn -> + -> post_attention_layernorm ->
mlp -> +`. `unsupported(model, length)` says why another model keeps the standard forward.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from longrope_cli.losses import decoder_of

log = logging.getLogger(__name__)

LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]  # causal (q, k, v, scale)
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


def _rotary_chunk(rotary: nn.Module, hidden: torch.Tensor, positions: torch.Tensor, length: int):
    """cos / sin of `positions` (a chunk of this rank's positions) in a `length`-token sequence. The last
    position is appended and dropped: rotary modules that pick their tables by sequence length (longrope's
    short / long switch, dynamic NTK) read the whole sequence's, while each call sees one chunk only."""
    count = len(positions)
    positions = torch.cat([positions, positions.new_tensor([length - 1])])
    cos, sin = rotary(hidden[:, :count], positions.unsqueeze(0))
    return cos[:, :count], sin[:, :count]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention over the whole sequence at once: SDPA (flash / memory-efficient kernels on the GPU)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _query_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Causal attention of the queries at start..start+n over keys 0..start+n (the CPU path): the square block
    on the diagonal (causal) and the keys before it (unmasked), merged by their log-sum-exp, exactly the
    softmax over all of them. The unmasked part splits evenly over threads, which one causal head does not
    (the CPU kernel gives each thread a contiguous run of query blocks: 3/4 of the work to the last one)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    stop = start + q.shape[2]
    diagonal, diagonal_lse = flash(q, k[:, :, start:stop], v[:, :, start:stop], is_causal=True, scale=scale)[:2]
    if start == 0:
        return diagonal
    past, past_lse = flash(q, k[:, :, :start], v[:, :, :start], is_causal=False, scale=scale)[:2]
    lse = torch.logaddexp(past_lse, diagonal_lse)
    return past * (past_lse - lse).exp().unsqueeze(-1) + diagonal * (diagonal_lse - lse).exp().unsqueeze(-1)


def _attention(layer: nn.Module, hidden: torch.Tensor, rotary: list[tuple[torch.Tensor, torch.Tensor]], chunk: int,
               kv_group: int, attend: Attend | None) -> torch.Tensor:
    """The attention block's output (before the residual add), `kv_group` key/value heads at a time.
    `hidden` holds a sequence (or a context-parallel rank's share of one, with `attend` mixing across ranks),
    `rotary` its cos / sin chunk by chunk. `attend` None (the CPU): queries a chunk at a time
    (`_query_block`), so only the keys and values of the group exist at full length; otherwise `attend` takes
    the group's whole q, k and v."""
    attn, config = layer.self_attn, layer.self_attn.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    d, rep = attn.head_dim, heads // kv_heads
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the architecture's own (partial rotary too)
    wq, wk, wv = _projections(attn, heads, kv_heads, d)
    batch, local, _ = hidden.shape
    spans = [slice(start, start + chunk) for start in range(0, local, chunk)]

    def project(index: int, rows: tuple) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(projections of the normed chunk, one per `rows`, as (B, heads, n, d)), and the chunk's cos / sin."""
        x = layer.input_layernorm(hidden[:, spans[index]])
        projected = [F.linear(x, w, b).view(batch, x.shape[1], -1, d).transpose(1, 2) for w, b in rows]
        return projected, rotary[index]

    out = torch.zeros_like(hidden)
    for k0 in range(0, kv_heads, kv_group):
        k1 = min(kv_heads, k0 + kv_group)
        q_rows, k_rows, v_rows = _rows(wq, k0 * rep, k1 * rep, d), _rows(wk, k0, k1, d), _rows(wv, k0, k1, d)
        whole = attend is not None
        q = hidden.new_empty(batch, (k1 - k0) * rep, local, d) if whole else None
        k = hidden.new_empty(batch, k1 - k0, local, d)
        v = torch.empty_like(k)
        for index, span in enumerate(spans):  # rotated a chunk at a time: no full-length copies
            if whole:
                (q_c, k_c, v[:, :, span]), (cos, sin) = project(index, (q_rows, k_rows, v_rows))
                q[:, :, span], k[:, :, span] = rope(q_c, k_c, cos, sin)
            else:
                (k_c, v[:, :, span]), (cos, sin) = project(index, (k_rows, v_rows))
                k[:, :, span] = rope(k_c[:, :0], k_c, cos, sin)[1]  # zero query heads: keys rotated alone
        if rep > 1:  # grouped-query attention: each kv head serves `rep` query heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        w_o = attn.o_proj.weight[:, k0 * rep * d:k1 * rep * d]
        o = attend(q, k, v, attn.scaling) if whole else None
        del q
        for index, span in enumerate(spans):
            if whole:
                piece = o[:, :, span]
            else:
                (q_c,), (cos, sin) = project(index, (q_rows,))
                piece = _query_block(rope(q_c, q_c[:, :0], cos, sin)[0], k, v, span.start, attn.scaling)
            out[:, span] += F.linear(piece.transpose(1, 2).reshape(batch, -1, w_o.shape[1]), w_o)
        del o, k, v
    if attn.o_proj.bias is not None:
        out += attn.o_proj.bias
    return out


@torch.no_grad()
def layerwise_hidden(model: Any, input_ids: torch.Tensor, chunk: int = 1024, kv_group: int = 1,
                     positions: torch.Tensor | None = None, length: int | None = None,
                     attend: Attend | None = None) -> torch.Tensor:
    """The final hidden states (B, L, hidden) of the decoder, as `decoder(input_ids).last_hidden_state`, computed
    layer by layer: per-token work over `chunk` positions at a time, attention over `kv_group` kv heads at a time
    (on the CPU its queries a chunk at a time too; on the GPU SDPA takes the whole sequence).

    Context parallel (`longrope_cli.context_parallel`): `input_ids` are this rank's tokens, at `positions` of a
    `length`-token sequence, and `attend` is the ring attention over the ranks; default: the whole sequence."""
    decoder = decoder_of(model)
    kv_group = max(1, kv_group)
    if attend is None and input_ids.device.type != "cpu":
        attend = causal_attention
    local = input_ids.shape[1]
    if positions is None:
        positions = torch.arange(local, device=input_ids.device)
    length = local if length is None else length
    hidden = decoder.embed_tokens(input_ids)
    # cos / sin once for every layer (head_dim values per token, a fraction of one hidden vector)
    rotary = [_rotary_chunk(decoder.rotary_emb, hidden, positions[start:start + chunk], length)
              for start in range(0, local, chunk)]
    for index, layer in enumerate(decoder.layers):
        hidden += _attention(layer, hidden, rotary, chunk, kv_group, attend)
        for start in range(0, local, chunk):
            span = slice(start, start + chunk)
            hidden[:, span] += layer.mlp(layer.post_attention_layernorm(hidden[:, span]))
        if length >= LONG_FORWARD:
            log.info("scoring %d tokens: layer %d/%d done", length, index + 1, len(decoder.layers))
    for start in range(0, local, chunk):
        span = slice(start, start + chunk)
        hidden[:, span] = decoder.norm(hidden[:, span])
    return hidden

"""A scoring forward layer by layer: memory of weights + a few L x hidden tensors, at any length.

Only attention mixes positions. So, per decoder layer, everything else runs over slices of the sequence
(norms, the q / k / v / o projections, the MLP, the residual adds, in place), and attention runs over the whole
sequence one group of heads at a time: q, k and v of all heads never exist at once. The layer's normed input is
kept (one L x hidden buffer) so that every head group projects from it. On the GPU SDPA takes the group's whole
q, k, v (flash kernels); on the CPU the queries go a span of a few chunks at a time against the group's keys
(`_cpu_attention`), which also keeps every thread busy. With the loss computed from hidden states in chunks
(`losses.chunked_nll`) there is no KV cache and no L x vocab tensor.
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


def _stacked(parts: list[tuple[tuple[torch.Tensor, torch.Tensor | None], int, int]], d: int):
    """One (weight, bias) of the heads first..last of each (weight, bias), and each part's head count: the
    group's projections as one matmul."""
    weights = [w[first * d:last * d] for (w, _), first, last in parts]
    with_bias = any(b is not None for (_, b), _, _ in parts)
    biases = [b[first * d:last * d] if b is not None else w.new_zeros((last - first) * d)
              for (w, b), first, last in parts] if with_bias else []
    counts = [last - first for _, first, last in parts]
    weight = weights[0] if len(weights) == 1 else torch.cat(weights)
    return weight, (torch.cat(biases) if with_bias else None), counts


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


def _diagonal_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int, scale: float):
    """Causal attention of each `chunk`-sized block of a span (B, H, n, d) over its own block only, with its
    log-sum-exp. The blocks go to the kernel as heads of one call, so each thread takes whole blocks: one causal
    block per call would give one thread 3/4 of the work (the CPU kernel splits a head's query rows in runs)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    batch, heads, n, d = q.shape
    blocks, rest = divmod(n, chunk)
    if rest:  # a ragged last span: block by block
        parts = [flash(q[:, :, s:s + chunk], k[:, :, s:s + chunk], v[:, :, s:s + chunk], is_causal=True,
                       scale=scale)[:2] for s in range(0, n, chunk)]
        return torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)
    as_heads = (batch * heads, blocks, chunk, d)
    out, lse = flash(q.reshape(as_heads), k.reshape(as_heads), v.reshape(as_heads), is_causal=True, scale=scale)[:2]
    return out.reshape(batch, heads, n, d), lse.reshape(batch, heads, n)


def _cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, chunk: int,
                   scale: float) -> torch.Tensor:
    """Causal attention of the queries q (B, H, n, d) at start..start+n over keys 0..start+n (the CPU path): per
    `chunk` of queries, the square block on the diagonal (causal) and the keys before it (unmasked), merged by
    their log-sum-exp: exactly the softmax over all of them. The unmasked part splits evenly over threads."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    n = q.shape[2]
    out, lse = _diagonal_blocks(q, k[:, :, start:start + n], v[:, :, start:start + n], chunk, scale)
    for offset in range(0, n, chunk):
        first = start + offset
        if first == 0:
            continue
        rows = slice(offset, offset + chunk)
        past, past_lse = flash(q[:, :, rows], k[:, :, :first], v[:, :, :first], is_causal=False, scale=scale)[:2]
        # weights exp(lse_part - logaddexp(both)): the past's is sigmoid(past_lse - diagonal_lse)
        out[:, :, rows].lerp_(past, torch.sigmoid(past_lse - lse[:, :, rows]).unsqueeze(-1).to(out.dtype))
    return out


def _attention(layer: nn.Module, hidden: torch.Tensor, rotary: list[tuple[torch.Tensor, torch.Tensor]], span: int,
               chunk: int, kv_group: int, attend: Attend | None) -> None:
    """Adds the attention block's output to `hidden` (the residual add), `kv_group` key/value heads at a time.
    `hidden` holds a sequence (or a context-parallel rank's share of one, with `attend` mixing across ranks),
    `rotary` its cos / sin `span` positions at a time. The layer's normed input is computed once into a buffer
    the size of `hidden`, so every head group projects from it while `hidden` already takes the earlier groups'
    outputs. `attend` None (the CPU): queries a span at a time (`_cpu_attention`, `chunk`-sized blocks), so only
    the keys and values of the group exist at full length; otherwise `attend` takes the group's whole q, k, v."""
    attn, config = layer.self_attn, layer.self_attn.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    d, rep = attn.head_dim, heads // kv_heads
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the architecture's own (partial rotary too)
    wq, wk, wv = _projections(attn, heads, kv_heads, d)
    batch, local, _ = hidden.shape
    spans = [slice(start, min(local, start + span)) for start in range(0, local, span)]
    normed = torch.empty_like(hidden)
    for start in range(0, local, chunk):  # chunks, not spans: a norm's temporaries are hidden-wide
        normed[:, start:start + chunk] = layer.input_layernorm(hidden[:, start:start + chunk])

    def project(index: int, stacked: tuple) -> tuple[torch.Tensor, ...]:
        """The stacked projections of the normed span `index`, split per part, as (B, heads, n, d)."""
        x = normed[:, spans[index]]
        weight, bias, counts = stacked
        return F.linear(x, weight, bias).view(batch, x.shape[1], -1, d).transpose(1, 2).split(counts, dim=1)

    whole = attend is not None
    for k0 in range(0, kv_heads, kv_group):
        k1 = min(kv_heads, k0 + kv_group)
        q_part, kv_parts = (wq, k0 * rep, k1 * rep), [(wk, k0, k1), (wv, k0, k1)]
        q = hidden.new_empty(batch, (k1 - k0) * rep, local, d) if whole else None
        k = hidden.new_empty(batch, k1 - k0, local, d)
        v = torch.empty_like(k)
        first_pass = _stacked([q_part, *kv_parts] if whole else kv_parts, d)
        for index, rows in enumerate(spans):  # rotated a span at a time: no full-length copies
            cos, sin = rotary[index]
            if whole:
                q_c, k_c, v[:, :, rows] = project(index, first_pass)
                q[:, :, rows], k[:, :, rows] = rope(q_c, k_c, cos, sin)
            else:
                k_c, v[:, :, rows] = project(index, first_pass)
                k[:, :, rows] = rope(k_c[:, :0], k_c, cos, sin)[1]  # zero query heads: keys rotated alone
        del first_pass
        if rep > 1:  # grouped-query attention: each kv head serves `rep` query heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        w_o = attn.o_proj.weight[:, k0 * rep * d:k1 * rep * d].t()
        o = attend(q, k, v, attn.scaling) if whole else None
        del q
        queries = None if whole else _stacked([q_part], d)
        for index, rows in enumerate(spans):
            if whole:
                piece = o[:, :, rows]
            else:
                (q_c,), (cos, sin) = project(index, queries), rotary[index]
                piece = _cpu_attention(rope(q_c, q_c[:, :0], cos, sin)[0], k, v, rows.start, chunk, attn.scaling)
            piece = piece.transpose(1, 2).reshape(batch, -1, w_o.shape[0])
            for b in range(batch):  # the o projection summed into the residual stream by the matmul itself
                hidden[b, rows].addmm_(piece[b], w_o)
        del o, k, v
    if attn.o_proj.bias is not None:
        hidden += attn.o_proj.bias


@torch.no_grad()
def layerwise_hidden(model: Any, input_ids: torch.Tensor, chunk: int = 1024, kv_group: int = 1,
                     positions: torch.Tensor | None = None, length: int | None = None,
                     attend: Attend | None = None) -> torch.Tensor:
    """The final hidden states (B, L, hidden) of the decoder, as `decoder(input_ids).last_hidden_state`, computed
    layer by layer: per-token work over `chunk` positions at a time, attention over `kv_group` kv heads at a time
    (on the CPU its queries a few chunks at a time too; on the GPU SDPA takes the whole sequence).

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
    # Attention works on spans of several chunks: fewer, larger kernel calls. Its temporaries, a few span x
    # (one group's heads) tensors, stay at a few chunk x hidden (below the MLP's chunk x intermediate x 3);
    # on the CPU a `_diagonal_blocks` block per thread (up to 8: the diagonal is a small part of the work).
    groups = -(-model.config.num_key_value_heads // kv_group)
    blocks = max(groups, min(8, torch.get_num_threads())) if attend is None else groups
    query_span = chunk * blocks
    # cos / sin once for every layer (head_dim values per token, a fraction of one hidden vector)
    rotary = [_rotary_chunk(decoder.rotary_emb, hidden, positions[start:start + query_span], length)
              for start in range(0, local, query_span)]
    for index, layer in enumerate(decoder.layers):
        _attention(layer, hidden, rotary, query_span, chunk, kv_group, attend)
        for start in range(0, local, chunk):
            span = slice(start, start + chunk)
            hidden[:, span] += layer.mlp(layer.post_attention_layernorm(hidden[:, span]))
        if length >= LONG_FORWARD:
            log.info("scoring %d tokens: layer %d/%d done", length, index + 1, len(decoder.layers))
    for start in range(0, local, chunk):
        span = slice(start, start + chunk)
        hidden[:, span] = decoder.norm(hidden[:, span])
    return hidden

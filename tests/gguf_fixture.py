"""Write a float32 Hugging Face Llama (+ its byte-level BPE tokenizer) to a GGUF file, for the GGUF loading tests.

Only what transformers' GGUF reader for architecture `llama` reads back is written (see its
`GGUF_CONFIG_MAPPING["llama"]`, `GGUF_TOKENIZER_MAPPING` and `LlamaTensorProcessor`):

- metadata `llama.*` (shape, rope base, norm epsilon, context length) and `general.*`;
- the tokenizer as `tokenizer.ggml.model = "gpt2"`: tokens in id order, token types, merges and special ids;
- the weights under GGUF's standard tensor names (`token_embd`, `blk.N.attn_q`, ...), with the rows of
  q_proj / k_proj reordered from transformers' half-split rotary layout to GGUF's interleaved one (the
  loader undoes exactly this).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ARCH = "llama"

# GGUF token types (gguf.TokenType): 1 normal, 3 control (special tokens).
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3

# transformers' per-layer parameter name -> GGUF tensor name (GGUF's standard names for llama)
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_TENSORS = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}


def interleave_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder q/k projection rows per head from [first halves..., second halves...] (transformers'
    rotate_half layout) to [(x0, y0), (x1, y1), ...] pairs (GGUF's layout).

    Inverse of transformers' `LlamaTensorProcessor._reverse_permute_weights`.
    """
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensor_name(hf_name: str) -> str:
    """GGUF name for one transformers Llama parameter name, e.g. model.layers.0.mlp.up_proj.weight -> blk.0.ffn_up.weight."""
    stem, _, suffix = hf_name.rpartition(".")
    if stem in TOP_TENSORS:
        return f"{TOP_TENSORS[stem]}.{suffix}"
    parts = stem.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in LAYER_TENSORS:
        return f"blk.{parts[2]}.{LAYER_TENSORS['.'.join(parts[3:])]}.{suffix}"
    raise ValueError(f"no GGUF name for Llama parameter {hf_name!r}")


def _tokenizer_tables(tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens in id order, token types, merges as 'left right') from a fast byte-level BPE tokenizer."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE":
        raise ValueError(f"only byte-level BPE tokenizers are supported, not {state['model']['type']}")
    vocab = tokenizer.get_vocab()
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        if index >= len(tokens) or tokens[index] is not None:
            raise ValueError("tokenizer ids are not contiguous from 0")
        tokens[index] = token
    special = set(tokenizer.all_special_ids)
    types = [TOKEN_CONTROL if index in special else TOKEN_NORMAL for index in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    return tokens, types, merges


def write_llama_gguf(model, tokenizer, path: str | Path) -> Path:
    """Write `model` (a float32 `LlamaForCausalLM`) and `tokenizer` (a fast byte-level BPE) to `path` as GGUF."""
    from gguf import GGUFWriter

    config = model.config
    if config.model_type != "llama":
        raise ValueError(f"expected a llama model, got {config.model_type!r}")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError("only plain RoPE (rope_type 'default') can be written")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    tokens, types, merges = _tokenizer_tables(tokenizer)
    if len(tokens) != config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokens)} tokens but the model {config.vocab_size}")

    path = Path(path)
    writer = GGUFWriter(path, ARCH)  # writes general.architecture = "llama"
    writer.add_string("general.name", "tiny-llama")
    writer.add_uint32("general.file_type", 0)  # all float32
    writer.add_uint32(f"{ARCH}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{ARCH}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{ARCH}.block_count", config.num_hidden_layers)
    writer.add_uint32(f"{ARCH}.feed_forward_length", config.intermediate_size)
    writer.add_uint32(f"{ARCH}.attention.head_count", heads)
    writer.add_uint32(f"{ARCH}.attention.head_count_kv", kv_heads)
    writer.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_uint32(f"{ARCH}.rope.dimension_count", head_dim)
    writer.add_float32(f"{ARCH}.rope.freq_base", float(theta))
    writer.add_uint32(f"{ARCH}.vocab_size", config.vocab_size)

    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", types)
    writer.add_array("tokenizer.ggml.merges", merges)
    for key, token_id in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                          ("unknown_token_id", tokenizer.unk_token_id), ("padding_token_id", tokenizer.pad_token_id)):
        if token_id is not None:
            writer.add_uint32(f"tokenizer.ggml.{key}", token_id)
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    writer.add_bool("tokenizer.ggml.add_eos_token", False)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # GGUF: no `output.weight` means the embedding is reused
        data = tensor.detach().to("cpu").float().numpy().copy()
        if ".self_attn.q_proj." in name:  # weight and bias alike, as the loader un-permutes both
            data = interleave_rotary_rows(data, heads)
        elif ".self_attn.k_proj." in name:
            data = interleave_rotary_rows(data, kv_heads)
        writer.add_tensor(gguf_tensor_name(name), data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

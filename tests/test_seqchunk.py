"""Sequence-chunked MLPs give the plain forward's logits on every supported architecture, and are undone after."""

from __future__ import annotations

import pytest
import torch

from longrope_cli.evaluate.perplexity import window_nll
from longrope_cli.losses import chunked_nll, decoder_of, shift_labels
from longrope_cli.seqchunk import chunked_mlps, decoder_mlps


def small(kind: str):
    import transformers as tf

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, attn_implementation="sdpa")
    torch.manual_seed(0)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, num_key_value_heads=4)).eval()
    if kind == "mistral-gqa":
        return tf.MistralForCausalLM(tf.MistralConfig(**common, num_key_value_heads=2, sliding_window=None)).eval()
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_key_value_heads=2)).eval()
    if kind == "phi3-partial":  # fused gate_up projection, partial rotary
        return tf.Phi3ForCausalLM(tf.Phi3Config(**common, num_key_value_heads=4, partial_rotary_factor=0.5,
                                                pad_token_id=0)).eval()
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["llama", "mistral-gqa", "qwen2", "phi3-partial"])
def test_chunked_mlps_are_exact(kind):
    model = small(kind)
    ids = torch.randint(0, 320, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = decoder_of(model)(input_ids=ids, use_cache=False).last_hidden_state
        with chunked_mlps(model, 48) as wrapped:
            chunked = decoder_of(model)(input_ids=ids, use_cache=False).last_hidden_state
            inside = [m.forward for m in decoder_mlps(model)]
        after = [m.forward for m in decoder_mlps(model)]
    assert wrapped == 2
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    assert all("run" in f.__qualname__ for f in inside)  # they really ran chunked
    assert all("run" not in f.__qualname__ for f in after)  # and are restored
    nll, count = window_nll(model, ids, chunk=48)
    with torch.no_grad():
        total, n = chunked_nll(model, plain, shift_labels(ids))
    assert count == int(n) and nll == pytest.approx(float(total), rel=1e-5)


def test_chunks_see_one_slice_at_a_time():
    model = small("llama")
    seen = []
    handle = decoder_mlps(model)[0].down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[-2]))
    try:
        with torch.no_grad(), chunked_mlps(model, 64):
            decoder_of(model)(input_ids=torch.zeros(1, 200, dtype=torch.long), use_cache=False)
    finally:
        handle.remove()
    assert seen == [64, 64, 64, 8]


def test_chunked_mlps_with_recompute_give_the_same_loss_and_gradients():
    """Fine-tuning's MLP slices, each checkpointed on its own: the same loss and gradients as the whole sequence."""
    from conftest import tiny_llama
    from longrope_cli.training.trainer import ChunkedCausalLM, enable_checkpointing

    ids = torch.randint(3, 300, (2, 96))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    results = []
    for mlp_chunk in (0, 16):
        torch.manual_seed(0)
        model = tiny_llama()
        model.train()
        enable_checkpointing(model)
        module = ChunkedCausalLM(model, chunk=32, mlp_chunk=mlp_chunk)
        nll, count = module(ids, labels)
        (nll / count).backward()
        results.append((float(nll), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (whole, whole_grads), (sliced, sliced_grads) = results
    assert sliced == pytest.approx(whole, rel=1e-6)
    assert whole_grads.keys() == sliced_grads.keys() and any("mlp" in n for n in whole_grads)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(sliced_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

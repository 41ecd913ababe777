"""`load_model("model.gguf")`: a tiny float32 Llama written to GGUF loads back with the same logits, tokenizer and
rotary layout, and takes LongRoPE factors like a Hugging Face directory does."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf", reason="GGUF tests need the `gguf` package (pip install 'longrope-cli[gguf]')")
pytest.importorskip("accelerate", reason="transformers refuses gguf_file= without `accelerate` installed")

from conftest import tiny_llama  # noqa: E402
from gguf_fixture import interleave_rotary_rows, write_llama_gguf  # noqa: E402
from longrope_cli.models import load_model, resolve_model  # noqa: E402
from longrope_cli.rope.baselines import pi_factors  # noqa: E402
from longrope_cli.rope.rotary import install_factors, remove_factors  # noqa: E402

WINDOW = 64
# GGUF cannot state the tiny tokenizer's Digits pre-tokenizer (the GPT-2 split is used instead), but its vocabulary
# has no multi-digit merges, so a pass key still tokenizes the same.
SENTENCE = "The sister said that Elizabeth was not at home. The pass key is 71432, remember it."


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory, tiny_tokenizer):
    """(original HF model, its tokenizer, path of its GGUF copy, LoadedModel from that path)."""
    model = tiny_llama(original=WINDOW, vocab=len(tiny_tokenizer), seed=3)
    path = write_llama_gguf(model, tiny_tokenizer, tmp_path_factory.mktemp("gguf") / "tiny-llama-f32.gguf")
    lm = load_model(str(path), device="cpu", dtype="float32")
    return model, tiny_tokenizer, path, lm


def test_resolve_gguf_file_and_directory(gguf_model):
    _, _, path, _ = gguf_model
    assert resolve_model(str(path)) == (path.parent, path.name)
    assert resolve_model(str(path.parent)) == (path.parent, path.name)  # a folder holding one .gguf


def test_gguf_logits_match_original(gguf_model):
    model, tokenizer, _, lm = gguf_model
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert lm.model.config.vocab_size == len(tokenizer)
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    ids = torch.randint(0, len(tokenizer), (2, 48), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(lm.model, ids), _logits(model, ids), atol=1e-4, rtol=0)


def test_gguf_tokenizer_round_trips(gguf_model):
    _, tokenizer, _, lm = gguf_model
    ids = lm.tokenizer(SENTENCE, add_special_tokens=False).input_ids
    assert ids == tokenizer(SENTENCE, add_special_tokens=False).input_ids
    assert lm.tokenizer.decode(ids) == SENTENCE
    assert (lm.tokenizer.bos_token, lm.tokenizer.eos_token) == ("<s>", "</s>")
    assert (lm.tokenizer.bos_token_id, lm.tokenizer.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert lm.tokenizer.pad_token_id == tokenizer.eos_token_id  # load_model pads with EOS when none is set
    assert lm.tokenizer.convert_tokens_to_ids("</s>") == tokenizer.eos_token_id
    assert lm.tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=True) == ""


def test_gguf_layout(gguf_model):
    model, _, _, lm = gguf_model
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert lm.layout.pairs == head_dim // 2 == 16
    assert lm.layout.rotary_dim == lm.layout.head_dim == head_dim
    assert lm.layout.rope_theta == 10000.0
    assert lm.layout.original_length == WINDOW
    assert lm.layout.model_type == "llama"


def test_gguf_model_takes_factors(gguf_model):
    """Factors change the logits past the window, exactly as they do on the original model."""
    model, tokenizer, _, lm = gguf_model
    ids = torch.randint(0, len(tokenizer), (1, 2 * WINDOW), generator=torch.Generator().manual_seed(1))
    plain = _logits(lm.model, ids)
    factors = pi_factors(lm.layout, 2 * WINDOW)
    assert set(factors.long_factor) == {2.0}
    try:
        install_factors(lm.model, factors, lm.layout)
        install_factors(model, factors)
        scaled = _logits(lm.model, ids)
        reference = _logits(model, ids)
    finally:
        remove_factors(lm.model)
        remove_factors(model)
    # A random tiny model barely looks at positions (changes of ~4e-3 here): far above float32 noise, which is 0.
    assert (scaled - plain)[:, WINDOW:].abs().max() > 1e-3
    torch.testing.assert_close(scaled[:, 0], plain[:, 0], atol=1e-6, rtol=0)  # position 0: angle 0 either way
    torch.testing.assert_close(scaled, reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(_logits(lm.model, ids), plain, atol=0, rtol=0)  # removed cleanly


def test_gguf_grouped_query_attention(tmp_path, tiny_tokenizer):
    """k_proj is un-permuted with the key/value head count, q_proj with the query head count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=WINDOW,
                         rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    path = write_llama_gguf(model, tiny_tokenizer, tmp_path / "gqa.gguf")
    lm = load_model(str(path), device="cpu", dtype="float32")
    assert lm.model.config.num_key_value_heads == 2 and lm.model.config.tie_word_embeddings
    assert (lm.layout.pairs, lm.layout.rope_theta) == (8, 50000.0)
    ids = torch.randint(0, len(tiny_tokenizer), (1, 40), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(lm.model, ids), _logits(model, ids), atol=1e-4, rtol=0)


def test_interleave_is_the_layout_transformers_undoes():
    """The fixture's q/k row order is the inverse of transformers' `LlamaTensorProcessor` (heads=2, head_dim=4)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = torch.arange(8.0).reshape(8, 1).numpy()
    interleaved = interleave_rotary_rows(rows, heads=2)
    assert interleaved[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    restored = LlamaTensorProcessor({"num_attention_heads": 2, "num_key_value_heads": 2}).process(
        interleaved, "blk.0.attn_q.weight").weights
    assert restored[:, 0].tolist() == rows[:, 0].tolist()


def test_gguf_model_exports_for_plain_transformers(gguf_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from longrope_cli.api import export

    model, _, _, lm = gguf_model
    factors = pi_factors(lm.layout, 2 * WINDOW)
    out = export(lm, factors, tmp_path / "exported")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert getattr(reloaded.config, "quantization_config", None) is None
    ids = torch.randint(0, model.config.vocab_size, (1, 2 * WINDOW), generator=torch.Generator().manual_seed(5))
    install_factors(lm.model, factors, lm.layout)
    try:
        torch.testing.assert_close(_logits(reloaded, ids), _logits(lm.model, ids), atol=1e-4, rtol=1e-4)
    finally:
        remove_factors(lm.model)

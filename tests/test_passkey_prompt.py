"""Unit tests for the passkey prompt builder and scorer (fast, CPU only)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from longrope_cli.evaluate.passkey import (
    FILLER_SENTENCES,
    INTRO,
    QUESTION,
    PasskeyResult,
    _is_correct,
    build_passkey_example,
    build_passkey_prompt,
    passkey_answer_ids,
    passkey_keys,
    score_passkey,
)

TESTBED = Path(__file__).resolve().parent.parent / "src" / "longrope_cli" / "assets" / "testbed"


def _tiny_tokenizer():
    """A small byte-level BPE with the test bed's pre-tokenization, when the test bed is absent."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([INTRO, " ".join(FILLER_SENTENCES) * 20, QUESTION], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tok():
    if (TESTBED / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(TESTBED)
    return _tiny_tokenizer()


def _sentence_len(tok) -> int:
    return max(len(tok.encode(" " + s, add_special_tokens=False)) for s in FILLER_SENTENCES)


@pytest.mark.parametrize("length", [120, 200, 255, 256, 257, 300, 512, 1000, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_prompt_fits_and_fills_the_length(tok, length, depth):
    key = 48213
    ids = build_passkey_prompt(tok, length, depth, key)
    answer = passkey_answer_ids(tok, key)
    assert len(ids) + len(answer) <= length
    assert len(ids) + len(answer) == length  # the partial filler sentence fills the gap exactly
    assert ids[0] == tok.bos_token_id
    assert tok.bos_token_id not in ids[1:]


def test_prompt_text_has_the_paper_form(tok):
    key = 70531
    text = tok.decode(build_passkey_prompt(tok, 400, 0.5, key), skip_special_tokens=True)
    assert text.startswith(INTRO)
    assert text.endswith(QUESTION)
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in text
    assert text.count(str(key)) == 2
    assert "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again." in text


def test_answer_is_space_then_one_token_per_digit(tok):
    answer = passkey_answer_ids(tok, 12345)
    assert tok.decode(answer) == " 12345"
    assert len(answer) == 6  # " " + five single-digit tokens


@pytest.mark.parametrize("length", [256, 1024, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0])
def test_key_sits_at_the_requested_depth(tok, length, depth):
    ex = build_passkey_example(tok, length, depth, 31337)
    key_ids = ex.ids[ex.key_start : ex.key_end]
    assert tok.decode(key_ids).strip().startswith("The pass key is 31337.")
    filler_tokens = (ex.filler_end - ex.filler_start) - (ex.key_end - ex.key_start)
    position = (ex.key_start - ex.filler_start) / filler_tokens
    # within one filler sentence (plus the partial tail) of the requested depth
    tolerance = 2 * _sentence_len(tok) / filler_tokens
    assert abs(position - depth) <= tolerance
    if depth == 0.0:
        assert ex.key_start == ex.filler_start
    if depth == 1.0:
        assert ex.filler_end - ex.key_end < _sentence_len(tok)


def test_key_moves_monotonically_with_depth(tok):
    starts = [build_passkey_example(tok, 2048, d / 10, 55555).key_start for d in range(11)]
    assert starts == sorted(starts)
    assert starts[0] < starts[5] < starts[10]


def test_keys_are_deterministic_and_five_digits():
    a = passkey_keys(0, 256, 0.5, 50)
    assert a == passkey_keys(0, 256, 0.5, 50)
    assert a[:10] == passkey_keys(0, 256, 0.5, 10)
    assert a != passkey_keys(1, 256, 0.5, 50)
    assert a != passkey_keys(0, 512, 0.5, 50)
    assert a != passkey_keys(0, 256, 0.25, 50)
    assert all(10_000 <= k <= 99_999 for k in a)
    assert len(set(a)) > 45


def test_invalid_arguments_raise(tok):
    with pytest.raises(ValueError, match="too short"):
        build_passkey_prompt(tok, 30, 0.5, 12345)
    with pytest.raises(ValueError, match="depth"):
        build_passkey_prompt(tok, 256, 1.5, 12345)
    with pytest.raises(ValueError, match="5 digits"):
        build_passkey_prompt(tok, 256, 0.5, 123)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (" 12345.", True),
        ("12345", True),
        (" 12345 is", True),
        (" 123456", False),
        (" 1234", False),
        (" 54321", False),
        ("", False),
        (" the 12345", False),
    ],
)
def test_answer_check(text, ok):
    assert _is_correct(text, 12345) is ok


class _Out(dict):
    @property
    def logits(self) -> torch.Tensor:
        return self["logits"]


class _FakeLM(torch.nn.Module):
    """Reads the key from the prompt text and answers it (or a fixed wrong key)."""

    def __init__(self, tok, wrong: bool = False):
        super().__init__()
        self.tok = tok
        self.wrong = wrong
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, use_cache=False, cache=None):
        self.calls += 1
        if cache is None:
            cache = {"prompts": input_ids.tolist(), "done": 0}
        else:
            cache = {**cache, "done": cache["done"] + 1}
        vocab = len(self.tok)
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], vocab)
        for row, prompt in enumerate(cache["prompts"]):
            key = int(re.search(r"pass key is (\d{5})", self.tok.decode(prompt)).group(1))
            answer = passkey_answer_ids(self.tok, 11111 if self.wrong else key)
            answer += self.tok.encode(".", add_special_tokens=False)
            logits[row, -1, answer[cache["done"]]] = 1.0
        return _Out(logits=logits, cache=cache)


def test_score_passkey_counts_right_and_wrong_answers(tok):
    model = _FakeLM(tok)
    results = score_passkey(model, tok, [256, 300], [0.0, 1.0], trials=5, seed=3, batch_size=2)
    assert [(r.length, r.depth) for r in results] == [(256, 0.0), (256, 1.0), (300, 0.0), (300, 1.0)]
    assert all(isinstance(r, PasskeyResult) and r.trials == 5 for r in results)
    assert all(r.correct == 5 and r.accuracy == 1.0 for r in results)
    # 4 cells x 3 batches (2+2+1) x (1 prompt pass + 6 cached steps)
    assert model.calls == 4 * 3 * 7

    wrong = score_passkey(_FakeLM(tok, wrong=True), tok, [256], [0.5], trials=4, seed=3)
    assert wrong[0].correct == 0 and wrong[0].accuracy == 0.0

"""Passkey retrieval: the LongRoPE paper's prompt and greedy scoring.

A passkey prompt hides a random 5-digit key inside repeated filler text and
asks for it at the end::

    <s>There is an important info hidden inside a lot of irrelevant text. Find it
    and memorize them. I will quiz you about the important information there.
    The grass is green. The sky is blue. ... The pass key is 12345. Remember it.
    12345 is the pass key. ... The grass is green. ... What is the pass key?
    The pass key is

The model must continue with `` 12345``. :func:`build_passkey_prompt` builds
the token ids of one prompt and :func:`score_passkey` measures greedy accuracy
over lengths and depths. Nothing here touches rotary embeddings: callers
install whatever scaling they want on the model first.
"""

from __future__ import annotations

import inspect
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "INTRO",
    "FILLER_SENTENCES",
    "QUESTION",
    "PasskeyResult",
    "PasskeyPrompt",
    "passkey_keys",
    "key_sentence",
    "passkey_answer_ids",
    "build_passkey_prompt",
    "build_passkey_example",
    "score_passkey",
]

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there."
)
FILLER_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
QUESTION = "What is the pass key? The pass key is"
KEY_DIGITS = 5
_ANCHOR = "."  # context used to tokenize a piece as it appears mid-text


def key_sentence(key: int) -> str:
    """The sentence that carries the key."""
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey_keys(seed: int, length: int, depth: float, trials: int) -> list[int]:
    """Deterministic 5-digit keys for one (length, depth) cell.

    Keys depend only on ``seed``, ``length`` and ``depth`` (not on which
    other cells are scored), so results are comparable across runs.
    """
    rng = random.Random(f"passkey:{seed}:{length}:{depth:.6f}")
    low, high = 10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS - 1
    return [rng.randint(low, high) for _ in range(trials)]


def _piece_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``" " + text`` as it is tokenized in the middle of a text.

    Encodes ``ANCHOR + " " + text`` and drops the anchor's ids, so byte-level
    BPE and SentencePiece tokenizers both give the mid-sentence form.
    """
    anchor = tokenizer.encode(_ANCHOR, add_special_tokens=False)
    full = tokenizer.encode(_ANCHOR + " " + text, add_special_tokens=False)
    if full[: len(anchor)] == anchor and len(full) > len(anchor):
        return full[len(anchor) :]
    return tokenizer.encode(" " + text, add_special_tokens=False)


def passkey_answer_ids(tokenizer, key: int) -> list[int]:
    """Token ids of the expected answer `` NNNNN`` following the prompt."""
    return _piece_ids(tokenizer, str(key))


@dataclass(frozen=True)
class PasskeyPrompt:
    """One built prompt: ``ids`` plus where the key sentence sits."""

    ids: list[int]
    key: int
    key_start: int  # index in ``ids`` of the key sentence's first token
    key_end: int  # index one past its last token
    filler_start: int  # index of the first filler token
    filler_end: int  # index one past the last filler token (question starts here)


def build_passkey_example(tokenizer, length: int, depth: float, key: int) -> PasskeyPrompt:
    """Build a prompt of at most ``length - len(answer)`` tokens, with positions.

    Filler sentences repeat in order; whole sentences are used as long as they
    fit and the remaining gap (less than one sentence) is filled with the
    first tokens of the next sentence, so the prompt plus the answer is
    exactly ``length`` tokens whenever ``length`` leaves room for any filler.
    The key sentence goes at the sentence boundary nearest to ``depth`` times
    the whole-sentence filler (0.0 = right after the intro, 1.0 = right after
    the last whole filler sentence).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be within [0, 1], got {depth}")
    if not 10 ** (KEY_DIGITS - 1) <= key < 10**KEY_DIGITS:
        raise ValueError(f"key must have {KEY_DIGITS} digits, got {key}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    intro = bos + tokenizer.encode(INTRO, add_special_tokens=False)
    needle = _piece_ids(tokenizer, key_sentence(key))
    question = _piece_ids(tokenizer, QUESTION)
    answer = passkey_answer_ids(tokenizer, key)
    budget = length - len(answer) - len(intro) - len(needle) - len(question)
    if budget < 0:
        minimum = length - budget
        raise ValueError(f"length {length} is too short for a passkey prompt (needs >= {minimum} tokens)")

    sentences = [_piece_ids(tokenizer, s) for s in FILLER_SENTENCES]
    whole: list[list[int]] = []
    used = 0
    while used + len(sentences[len(whole) % len(sentences)]) <= budget:
        piece = sentences[len(whole) % len(sentences)]
        whole.append(piece)
        used += len(piece)
    partial = sentences[len(whole) % len(sentences)][: budget - used]

    # Boundary offsets (in tokens) before each whole sentence and after the last one.
    offsets = [0]
    for piece in whole:
        offsets.append(offsets[-1] + len(piece))
    target = depth * offsets[-1]
    cut = min(range(len(offsets)), key=lambda i: (abs(offsets[i] - target), i))

    before = [t for piece in whole[:cut] for t in piece]
    after = [t for piece in whole[cut:] for t in piece] + partial
    ids = intro + before + needle + after + question
    key_start = len(intro) + len(before)
    return PasskeyPrompt(
        ids=ids,
        key=key,
        key_start=key_start,
        key_end=key_start + len(needle),
        filler_start=len(intro),
        filler_end=len(ids) - len(question),
    )


def build_passkey_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """Token ids (starting with BOS) of a passkey prompt for a ``length``-token context.

    The prompt is as long as possible while ``len(prompt) + len(answer) <= length``,
    where the answer is the ids of `` NNNNN`` (:func:`passkey_answer_ids`).
    ``depth`` in [0, 1] places the key in the filler (0 = start, 1 = end).
    """
    return build_passkey_example(tokenizer, length, depth, key).ids


@dataclass
class PasskeyResult:
    """Greedy passkey accuracy of one (length, depth) cell; ``accuracy = correct / trials``."""

    length: int
    depth: float
    trials: int
    correct: int
    accuracy: float = field(init=False)

    def __post_init__(self) -> None:
        self.accuracy = self.correct / self.trials if self.trials else 0.0


def _is_correct(text: str, key: int) -> bool:
    """True when the first run of digits in ``text`` (after spaces) is exactly the key."""
    match = re.match(r"\s*(\d+)", text)
    return match is not None and match.group(1) == str(key)


def _cache_kwarg(model) -> str:
    """Name of the forward argument that takes the KV cache (``cache`` in transformers >= 5.2x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.inference_mode()
def _greedy(model, batch: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the KV cache; returns the ``new_tokens`` generated ids."""
    kwarg = _cache_kwarg(model)
    # Only the last position's logits are needed: at 128k x 32k vocab the full prefill logits would be 16 GiB.
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=batch, use_cache=True, **keep)
    nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
    generated = [nxt]
    for _ in range(new_tokens - 1):
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        out = model(input_ids=nxt, use_cache=True, **{kwarg: cache})
        nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        generated.append(nxt)
    return torch.cat(generated, dim=1)


def score_passkey(
    model,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int = 0,
    progress: bool = False,
    batch_size: int = 8,
) -> list[PasskeyResult]:
    """Greedy passkey accuracy for every (length, depth) pair, in that order.

    For each cell, ``trials`` keys come from :func:`passkey_keys` (same seed,
    same keys), prompts come from :func:`build_passkey_prompt`, and the model
    greedily generates one token more than the answer needs; a trial is
    correct when the generated digits equal the key exactly. Prompts of equal
    token length are batched (``batch_size`` at a time, no padding). The
    model is used as passed (its rotary scaling, device and dtype); it is put
    in eval mode.
    """
    if trials < 1:
        raise ValueError("trials must be >= 1")
    model.eval()
    device = next(model.parameters()).device
    cells = [(int(length), float(depth)) for length in lengths for depth in depths]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells) * trials, desc="passkey", unit="trial")
    results: list[PasskeyResult] = []
    try:
        for length, depth in cells:
            keys = passkey_keys(seed, length, depth, trials)
            prompts = [build_passkey_prompt(tokenizer, length, depth, k) for k in keys]
            new_tokens = max(len(passkey_answer_ids(tokenizer, k)) for k in keys) + 1
            groups: dict[int, list[int]] = {}
            for i, ids in enumerate(prompts):
                groups.setdefault(len(ids), []).append(i)
            correct = 0
            for members in groups.values():
                for start in range(0, len(members), batch_size):
                    chunk = members[start : start + batch_size]
                    batch = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)
                    out = _greedy(model, batch, new_tokens)
                    for row, i in zip(out.tolist(), chunk, strict=True):
                        text = tokenizer.decode(row, skip_special_tokens=True)
                        correct += _is_correct(text, keys[i])
                    if bar is not None:
                        bar.update(len(chunk))
            results.append(PasskeyResult(length=length, depth=depth, trials=trials, correct=correct))
            if bar is not None:
                bar.set_postfix(length=length, depth=depth, acc=f"{results[-1].accuracy:.2f}")
    finally:
        if bar is not None:
            bar.close()
    return results

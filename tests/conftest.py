"""Shared fixtures: a tiny random Llama (seconds to build) and a tiny corpus for unit tests."""

from __future__ import annotations

import os
import random
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

SPLIT_SEEDS = {"train": 1, "search": 2, "eval": 3}

# The sizes of every small real search in the tests (seconds on the tiny model): 8 + k x 6 evaluations after k
# generations. One definition; a test adds only what it means to vary (`small_search(iterations=3)`).
SMALL_SEARCH = {"population": 8, "survivors": 4, "mutations": 3, "crossovers": 3, "documents": 2}


def tiny_pipeline_recipe(model, corpus) -> dict:
    """A search -> readjust -> eval -> export recipe on the tiny model: every stage a few seconds."""
    return {
        "model": {"name": str(model), "device": "cpu"},
        "data": {"corpus": str(corpus)},
        "search": {**SMALL_SEARCH, "iterations": 1, "attention_search": False},
        "readjust": {"population": 4, "iterations": 1, "documents": 1, "lengths": [32, 64]},
        "eval": {"lengths": [64, 128], "methods": ["none", "${short}"], "documents": 1, "plots": False},
        "stages": [
            {"name": "long", "command": "search", "overrides": {"search.target": 128, "search.start_tokens": 0}},
            {"name": "short", "command": "readjust", "overrides": {"readjust.factors": "${long}"}},
            {"name": "ev", "command": "eval"},
            {"name": "final", "command": "export"},
        ],
    }


def small_search(**changes) -> list[str]:
    """SMALL_SEARCH (updated with `changes`) as `search.key=value` overrides for load_recipe or the CLI."""
    def text(value) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)
    return [f"search.{key}={text(value)}" for key, value in {**SMALL_SEARCH, **changes}.items()]


LAUNCHERS = ("srun", "torchrun", "mpirun", "python", "python3")


def longrope_calls(argv: list[str]) -> list[list[str]]:
    """The arguments after `longrope` (or `-m longrope_cli`, also under torchrun / srun) in a shell command line,
    one list per longrope command between `&&`, `||`, `;` and `|`."""
    calls, segment = [], []
    for arg in [*argv, ";"]:
        if arg not in ("&&", "||", ";", "|"):
            segment.append(arg)
            continue
        if segment and segment[0] == "longrope":
            calls.append(segment[1:])
        elif segment and Path(segment[0]).name in LAUNCHERS:
            for i, word in enumerate(segment):
                if word == "longrope" or (word == "longrope_cli" and segment[i - 1] == "-m"):
                    calls.append(segment[i + 1:])
                    break
        segment = []
    return calls


def longrope_usage_problems(args: list[str]) -> list[str]:
    """What is wrong with `longrope ARGS` as documented: an unknown command or sub-command, an option the command
    does not have, or a `section.key=value` (also `STAGE.section.key=value`) naming no recipe key."""
    import click

    from longrope_cli.cli.main import cli
    from longrope_cli.recipe import field_docs

    ctx = click.Context(cli)
    command = cli.get_command(ctx, args[0]) if args else None
    if command is None:
        return [f"longrope {' '.join(args[:1])}: no such command"]
    words, rest = [args[0]], args[1:]
    if isinstance(command, click.Group):  # longrope recipe ls / cp / show / validate / fields
        sub = command.get_command(ctx, rest[0]) if rest else None
        if sub is None:
            return [f"longrope {' '.join(args[:2])}: no such sub-command"]
        command, words, rest = sub, [*words, rest[0]], rest[1:]
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help", "-h"}
    keys = {row[0] for row in field_docs()}
    sections = {key.split(".")[0] for key in keys}
    problems = []
    for arg in rest:
        name = arg.split("=", 1)[0]
        if arg.startswith("-") and name not in options:
            problems.append(f"longrope {' '.join(words)}: no option {name}")
        elif not arg.startswith("-") and "=" in arg and "." in name:
            parts = name.split(".")
            key = ".".join(parts[1:]) if parts[0] not in sections and len(parts) > 2 else name  # STAGE.section.key
            if key.split(".")[0] in sections and key not in keys:
                problems.append(f"longrope {' '.join(words)}: no recipe key {key}")
    return problems


WORDS = ["the", "of", "and", "to", "a", "in", "that", "was", "her", "she", "it", "not", "be", "his", "as", "had", "with", "for", "you", "he", "but", "my", "all", "so", "at", "which", "have", "by", "on", "mr", "elizabeth", "would", "very", "could", "said", "they", "were", "been", "from", "this", "sister", "more", "what"]


def tiny_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    sentences, words = [], 0
    while words < n_words:
        k = rng.randint(5, 15)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        words += k
    return " ".join(sentences)


def build_tiny_tokenizer(tmp: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([tiny_text(3000, 0)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return fast


def tiny_llama(rope_parameters: dict | None = None, original: int = 64, max_positions: int | None = None,
               vocab: int = 320, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    params = {"rope_type": "default", "rope_theta": 10000.0, **(rope_parameters or {})}
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_positions or original,
                         rope_parameters=params, attn_implementation="sdpa", **overrides)
    model = LlamaForCausalLM(config).eval()
    return model


def model_logits(model, length: int, seed: int = 1) -> torch.Tensor:
    """Logits of a model on `length` random ids (the same ids for the same seed)."""
    torch.manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama (original window 64) with a tokenizer: a stand-in for a real HF directory."""
    path = tmp_path_factory.mktemp("tiny-model")
    model = tiny_llama(vocab=len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """train/ search/ eval/ folders of plain-text documents."""
    root = tmp_path_factory.mktemp("corpus")
    for split, n in (("train", 3), ("search", 3), ("eval", 3)):
        (root / split).mkdir()
        for i in range(n):
            (root / split / f"doc{i}.txt").write_text(tiny_text(1500, 1000 * SPLIT_SEEDS[split] + i), encoding="utf-8")
    return root


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def testbed_available() -> bool:
    from longrope_cli.models import testbed_path

    return (testbed_path() / "model.safetensors").is_file()


requires_testbed = pytest.mark.skipif(not testbed_available(), reason="bundled test-bed model not built yet")


@pytest.fixture
def restore_logging():
    """Put the root logger back as it was: CLI commands in process attach console and file handlers to it."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


ARCHITECTURES = ("llama", "llama-gqa", "qwen2", "mistral", "phi3", "phi3-partial")


def tiny_architecture(kind: str):
    """A 2-layer random model of one architecture family the layer-by-layer forward serves."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=4))
    if kind == "llama-gqa":
        return LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2))
    if kind == "qwen2":  # q/k/v biases, GQA
        return Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2, use_sliding_window=False))
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**common, num_key_value_heads=2, sliding_window=None))
    if kind == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3ForCausalLM(Phi3Config(**common, num_key_value_heads=4, pad_token_id=0))
    if kind == "phi3-partial":
        return Phi3ForCausalLM(Phi3Config(**common, num_key_value_heads=2, pad_token_id=0, partial_rotary_factor=0.5))
    raise ValueError(kind)

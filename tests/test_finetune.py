"""`longrope finetune` on the tiny random Llama (original window 64, trained at 128 with YaRN factors)."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from longrope_cli.cli.main import cli
from longrope_cli.data import load_corpus, make_windows, tokenize_documents
from longrope_cli.errors import RecipeError
from longrope_cli.models import load_model
from longrope_cli.outputs import is_complete
from longrope_cli.recipe import build_recipe
from longrope_cli.rope.baselines import yarn_factors
from longrope_cli.rope.factors import FactorSet, load_factors
from longrope_cli.rope.rotary import install_factors, installed_factors
from longrope_cli.stages import finetune as ft
from longrope_cli.training import trainer
from longrope_cli.training.checkpoint import find_checkpoint, read_trainer_state
from longrope_cli.training.data import WindowIndex, WindowOrder

TARGET = 128
STEPS = 6


@pytest.fixture(scope="module")
def factor_file(tiny_model_dir, tmp_path_factory) -> Path:
    lm = load_model(str(tiny_model_dir), device="cpu")
    path = tmp_path_factory.mktemp("factors") / "yarn-128.json"
    yarn_factors(lm.layout, TARGET).save(path, lm.layout)
    return path


def make_recipe(model_dir, corpus, factor_path, cache, **finetune):
    settings = {"factors": str(factor_path), "target": TARGET, "steps": STEPS, "batch_size": 4, "micro_batch_size": 2,
                "lr": 2e-3, "warmup_steps": 1, "save_every": 2, **finetune}
    return build_recipe({"model": {"name": str(model_dir), "device": "cpu"},
                         "data": {"corpus": str(corpus), "cache_dir": str(cache)}, "finetune": settings})


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_corpus, factor_file, tmp_path_factory) -> Path:
    """An uninterrupted run: the yardstick for resumed ones."""
    out = tmp_path_factory.mktemp("reference")
    cache = tmp_path_factory.mktemp("cache")
    ft.run_finetune(make_recipe(tiny_model_dir, tiny_corpus, factor_file, cache), out, progress=False)
    return out


@pytest.fixture
def recipe(tiny_model_dir, tiny_corpus, factor_file, tmp_path):
    return make_recipe(tiny_model_dir, tiny_corpus, factor_file, tmp_path / "cache")


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases_and_outputs_are_complete(reference):
    rows = metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in rows)
    assert rows[0]["lr"] == pytest.approx(2e-3)  # warm-up of 1 step, then linear decay
    assert rows[-1]["lr"] == pytest.approx(2e-3 * (1 - (STEPS - 2) / (STEPS - 1)))
    assert is_complete(reference) and not (reference / "checkpoint").exists()
    assert json.loads((reference / "complete.json").read_text())["artifact"] == "model"


def test_model_dir_loads_in_plain_transformers_and_carries_the_factors(reference, factor_file):
    from transformers import AutoModelForCausalLM

    used = load_factors(reference)  # DIR/factors.json: what the next stage installs relative to
    assert used.long_factor == load_factors(factor_file).long_factor
    assert used.provenance["stage"] == "finetune" and used.provenance["steps"] == STEPS
    config = json.loads((reference / "model" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "longrope"
    assert config["rope_parameters"]["long_factor"] == list(used.long_factor)
    assert config["max_position_embeddings"] == TARGET
    plain = AutoModelForCausalLM.from_pretrained(reference / "model").eval()
    ours = load_model(str(reference / "model"), device="cpu")
    install_factors(ours.model, used, ours.layout)
    ids = torch.randint(0, plain.config.vocab_size, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ours.model(ids).logits, atol=2e-5, rtol=1e-4)
        tuned = plain(ids).logits
    original = load_model(str(Path(used.provenance["base_model"])), device="cpu")
    install_factors(original.model, used, original.layout)
    with torch.no_grad():
        assert not torch.allclose(original.model(ids).logits, tuned, atol=1e-3)  # the weights did change


def crash_before_step(monkeypatch, crash_step: int):
    """Make fine-tuning die ("node died") when it reaches 0-based step `crash_step`; returns the real step."""
    real_step = trainer.Finetune.step

    def crashing(self, step):
        if step == crash_step:
            raise RuntimeError("node died")
        return real_step(self, step)

    monkeypatch.setattr(trainer.Finetune, "step", crashing)
    return real_step


def test_resume_from_periodic_checkpoint_gives_the_same_weights(recipe, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_step = crash_before_step(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="node died"):
        ft.run_finetune(recipe, out, progress=False)
    assert read_trainer_state(find_checkpoint(out))["step"] == 2 and not is_complete(out)
    monkeypatch.setattr(trainer.Finetune, "step", real_step)
    ft.run_finetune(recipe, out, resume=True, progress=False)
    assert_same_weights(out, reference)
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1))  # steps 3.. logged once
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(reference)]


def test_sigterm_saves_a_checkpoint_then_resume_finishes(recipe, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_step = trainer.Finetune.step

    def preempted_during_3(self, step):
        result = real_step(self, step)
        if step == 2:
            signal.raise_signal(signal.SIGTERM)  # what SLURM sends before the time limit
        return result

    monkeypatch.setattr(trainer.Finetune, "step", preempted_during_3)
    with pytest.raises(trainer.Preempted, match="after step 3/6") as info:
        ft.run_finetune(recipe, out, progress=False)
    assert info.value.exit_code == 143
    assert read_trainer_state(find_checkpoint(out))["step"] == 3  # not a periodic one (every 2)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    monkeypatch.setattr(trainer.Finetune, "step", real_step)
    ft.run_finetune(recipe, out, resume=True, progress=False)
    assert_same_weights(out, reference)


def test_resume_refuses_a_checkpoint_of_other_settings(recipe, tiny_model_dir, tiny_corpus, factor_file,
                                                       tmp_path, monkeypatch):
    out = tmp_path / "run"
    crash_before_step(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="node died"):
        ft.run_finetune(recipe, out, progress=False)
    other = make_recipe(tiny_model_dir, tiny_corpus, factor_file, tmp_path / "cache", batch_size=2,
                        micro_batch_size=1)
    with pytest.raises(RecipeError, match="batch_size=4"):
        ft.run_finetune(other, out, resume=True, progress=False)


def test_start_tokens_keep_plain_rope_in_the_config(tiny_model_dir, tiny_corpus, tmp_path):
    lm = load_model(str(tiny_model_dir), device="cpu")
    factors = FactorSet(long_factor=(2.0,) * lm.layout.pairs, start_tokens=4, target_length=TARGET)
    factors.save(tmp_path / "nhat.json", lm.layout)
    out = tmp_path / "run"
    ft.run_finetune(make_recipe(tiny_model_dir, tiny_corpus, tmp_path / "nhat.json", tmp_path / "c", steps=1),
                    out, progress=False)
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "default" and "n-hat=4" in config["longrope"]["note"]
    assert load_factors(out / "model").start_tokens == 4 and load_factors(out).start_tokens == 4


@pytest.mark.parametrize(("changes", "message"), [
    ({"factors": None}, "finetune.factors is not set"),
    ({"batch_size": 3}, "multiple of micro_batch_size"),
    ({"steps": 0}, "finetune.steps=0 is out of range"),
])
def test_bad_settings_are_one_line_errors(tiny_model_dir, tiny_corpus, factor_file, tmp_path, changes, message):
    with pytest.raises(RecipeError, match=message):  # a range mistake fails as the recipe is built, the rest here
        ft.run_finetune(make_recipe(tiny_model_dir, tiny_corpus, factor_file, tmp_path / "c", **changes),
                        tmp_path / "run", progress=False)


def test_short_windows_train_with_the_short_factors_and_the_long_attention(tiny_model_dir, tiny_corpus, factor_file,
                                                                         tmp_path, monkeypatch):
    seen = []
    real = trainer.Finetune._micro_step

    def spy(self, ids, scale, sync):
        factors = installed_factors(self.lm.model)
        seen.append((ids.shape, scale, factors.short_factor, factors.attention))
        return real(self, ids, scale, sync)

    monkeypatch.setattr(trainer.Finetune, "_micro_step", spy)
    recipe = make_recipe(tiny_model_dir, tiny_corpus, factor_file, tmp_path / "c", short_batch_size=3, steps=2)
    out = tmp_path / "run"
    ft.run_finetune(recipe, out, progress=False)
    long_set = load_factors(factor_file)
    original = load_model(str(tiny_model_dir)).layout.original_length
    # per step: two long micro-batches of 2 x 128, then one of 3 short windows; every sequence weighs 1/7
    assert [shape for shape, *_ in seen] == [(2, TARGET), (2, TARGET), (3, original)] * 2
    assert [scale for _, scale, *_ in seen] == pytest.approx([2 / 7, 2 / 7, 3 / 7] * 2)
    assert all(short == (1.0,) * long_set.pairs and att == long_set.attention for _, _, short, att in seen)
    saved = load_factors(out / "factors.json")  # the file handed on is the one given, not the training variant
    assert saved.short_factor is None and saved.long_factor == long_set.long_factor
    config = json.loads((out / "model" / "config.json").read_text())  # but the model runs what was trained
    assert config["rope_scaling"]["short_factor"] == [1.0] * long_set.pairs
    with pytest.raises(RecipeError, match="not beyond the original window"):
        ft.run_finetune(make_recipe(tiny_model_dir, tiny_corpus, factor_file, tmp_path / "c", short_batch_size=2,
                                    target=original), tmp_path / "bad", progress=False)


def test_context_parallel_is_refused_on_cpu(recipe, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    recipe.parallel.context_parallel = 2
    with pytest.raises(RecipeError, match="context_parallel=2 needs CUDA"):
        ft.run_finetune(recipe, tmp_path / "run", progress=False)


def test_window_index_is_make_windows_lazily(tiny_corpus, tiny_tokenizer, tmp_path):
    docs = tokenize_documents(load_corpus(str(tiny_corpus)).split("train"), tiny_tokenizer, tmp_path)
    bos = tiny_tokenizer.bos_token_id
    for per_doc in (0, 2):
        index = WindowIndex(docs, 200, bos, per_doc)
        eager = make_windows(docs, 200, len(index), bos, per_doc, "train")
        assert torch.equal(index.batch(range(len(index))), eager)
    assert len(WindowIndex(docs, 200, bos, limit=5)) == 5


def test_window_order_is_a_function_of_the_step():
    order = WindowOrder(windows=10, batch_size=4, seed=3)
    stream = [i for step in range(5) for i in order.batch(step)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))  # whole passes
    assert stream[:10] != stream[10:20]  # reshuffled each pass
    assert WindowOrder(10, 4, 3).batch(3) == order.batch(3)
    shards = [order.shard(2, rank, 2) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(order.batch(2))


def test_lr_schedules():
    assert [trainer.lr_factor(s, 10, 2, "linear") for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    assert trainer.lr_factor(9, 10, 0, "constant") == 1.0
    assert trainer.lr_factor(5, 10, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert np.isclose(trainer.lr_factor(10, 10, 0, "linear"), 0.0)


def test_cli_runs_and_documents_itself(tiny_model_dir, tiny_corpus, factor_file, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, [
        "finetune", "--model", str(tiny_model_dir), "--factors", str(factor_file), "--steps", "2", "--target", "64",
        "--out", str(out), "--no-progress", f"data.corpus={tiny_corpus}", f"data.cache_dir={tmp_path / 'c'}",
        "finetune.batch_size=2", "model.device=cpu"])
    assert result.exit_code == 0, result.output
    assert is_complete(out) and len(metrics(out)) == 2
    assert load_factors(out).provenance["train_length"] == 64  # shorter than the factors' own target
    assert json.loads((out / "model" / "config.json").read_text())["max_position_embeddings"] == TARGET
    help_text = CliRunner().invoke(cli, ["finetune", "--help"]).output
    assert "$ longrope finetune" in help_text and "--resume" in help_text


def test_context_parallel_shards_are_not_read_as_packed_sequences(tiny_model_dir):
    """A load-balanced shard holds positions [0, 32) and [96, 128): causal attention must span the jump."""
    lm = load_model(str(tiny_model_dir), device="cpu")
    module = trainer.ChunkedCausalLM(lm.model, chunk=16)
    ids = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, 1)
    positions = torch.cat([torch.arange(32), torch.arange(96, 128)]).view(1, -1)
    with torch.no_grad():
        nll, _ = module(ids, labels, positions)
        hidden = lm.model.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        packed, _ = trainer.chunked_nll(lm.model, hidden, labels, chunk=16)
    assert not torch.allclose(nll, packed)  # without the guard the second chunk would not see the first


def test_a_metrics_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    from types import SimpleNamespace

    run = object.__new__(trainer.Finetune)
    run.out, run.env = tmp_path, SimpleNamespace(is_main=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo',
                                            encoding="utf-8")
    path = run._metrics_file(2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_a_stage_folder_drops_the_temporary_files_of_interrupted_writes(tmp_path):
    from longrope_cli.recipe import load_recipe
    from longrope_cli.stages.folder import stage_folder

    (tmp_path / "cells").mkdir()
    for name in (".complete.json.1a607a1135a9.tmp", "cells/.perplexity__none__64.json.0123456789ab.tmp"):
        (tmp_path / name).write_text("{", encoding="utf-8")
    (tmp_path / "notes.tmp").write_text("mine", encoding="utf-8")  # not an atomic write's: kept
    with stage_folder("eval", load_recipe(None, []), tmp_path) as folder:
        folder.open()
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == ["notes.tmp"]

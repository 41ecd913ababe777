"""`run_eval` and the report on the tiny random Llama (original window 64) and the tiny corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from longrope_cli.errors import FactorFileError, RecipeError
from longrope_cli.evaluate import methods as eval_methods
from longrope_cli.evaluate import sliding
from longrope_cli.evaluate.perplexity import score_perplexity, window_nll
from longrope_cli.models import load_model
from longrope_cli.recipe import build_recipe
from longrope_cli.report import PLOTS, markdown_table, perplexity_table, write_plots
from longrope_cli.rope.factors import FactorSet
from longrope_cli.stages import evaluate as runner

ORIGINAL = 64


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def make_recipe(model_dir: Path, corpus: Path, **eval_keys) -> object:
    eval_section = {"lengths": [32, 128], "methods": ["none", "pi", "yarn"], "documents": 2, "plots": False,
                    **eval_keys}
    return build_recipe({"model": {"name": str(model_dir), "device": "cpu"},
                         "data": {"corpus": str(corpus), "cache_dir": str(corpus.parent / "tokens")},
                         "eval": eval_section})


def ramp_factors(pairs: int, top: float) -> list[float]:
    return [1.0 + (top - 1.0) * i / (pairs - 1) for i in range(pairs)]


def test_results_json_plots_and_table(lm, tiny_model_dir, tiny_corpus, tmp_path):
    search_dir = tmp_path / "my-search"
    FactorSet(long_factor=ramp_factors(lm.layout.pairs, 3.0), target_length=128, method="longrope").save(
        search_dir / "factors.json", lm.layout)
    recipe = make_recipe(tiny_model_dir, tiny_corpus, methods=["none", "pi", "dynamic-ntk", "yarn",
                                                               str(search_dir / "factors.json")],
                         passkey_lengths=[512], passkey_depths=[0.0, 1.0], passkey_trials=2, plots=True)
    path = runner.run_eval(recipe, tmp_path / "out", lm=lm, progress=False).artifact
    results = json.loads(path.read_text())

    assert results["format"] == "longrope-eval" and results["complete"] is True
    prov = results["provenance"]
    assert prov["environment"]["versions"]["torch"] and prov["environment"]["git_revision"]
    assert prov["recipe"]["eval"]["lengths"] == ["32", "128"]
    assert prov["model"]["layout"]["original_length"] == ORIGINAL
    assert prov["data"]["windows"]["128"]["count"] == 2 and len(prov["data"]["windows"]["128"]["sha1"]) == 16
    assert [m["label"] for m in results["methods"]] == ["none", "pi", "dynamic-ntk", "yarn", "my-search"]
    cells = {(c["method"], c["length"]): c for c in results["perplexity"]}
    assert len(cells) == 10
    for cell in cells.values():
        assert cell["tokens"] == 2 * (cell["length"] - 1) and cell["windows"] == 2 and cell["seconds"] >= 0
        assert math.isfinite(cell["perplexity"])
    # inside the original window every baseline is plain RoPE; beyond it they differ
    below = {cells[(m, 32)]["perplexity"] for m in ("none", "pi", "dynamic-ntk", "yarn")}
    assert max(below) - min(below) < 1e-6
    assert abs(cells[("pi", 128)]["perplexity"] - cells[("none", 128)]["perplexity"]) > 1e-3
    # a factor file keeps its long factors at every length (no short_factor here)
    assert abs(cells[("my-search", 32)]["perplexity"] - cells[("none", 32)]["perplexity"]) > 1e-3
    # baselines are generated per length: pi's factors at the largest length are s = 512 / 64
    pi = next(m for m in results["methods"] if m["label"] == "pi")
    assert pi["factors_at"] == 512 and pi["factors"]["long_factor"][0] == pytest.approx(8.0)
    # passkey: one entry per (method, length, depth)
    assert len(results["passkey"]) == 5 * 2
    assert {(p["length"], p["depth"], p["trials"]) for p in results["passkey"]} == {(512, 0.0, 2), (512, 1.0, 2)}
    # plots and completion marker
    for name in PLOTS:
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "out" / "complete.json").read_text())["artifact"] == "results.json"
    # table: the best perplexity of a column is highlighted, and only that one
    from rich.console import Console

    console = Console(record=True, width=200, color_system="truecolor")
    console.print(perplexity_table(results))
    best = min(cells[(m, 128)]["perplexity"] for m in ("none", "pi", "dynamic-ntk", "yarn", "my-search"))
    assert f"{best:.2f}" in console.export_text()
    assert markdown_table(results).count("\n") == 2 + 5 - 1


def test_resume_skips_finished_cells_after_a_crash(lm, tiny_model_dir, tiny_corpus, tmp_path):
    recipe = make_recipe(tiny_model_dir, tiny_corpus)
    calls = []

    def crashing(model, windows, **kw):
        calls.append(windows.shape)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return score_perplexity(model, windows, **kw)

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        runner.run_eval(recipe, out, lm=lm, progress=False, scorer=crashing)
    assert len(list((out / "cells").glob("perplexity__*.json"))) == 3
    assert not (out / "complete.json").exists()
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False and len(partial["perplexity"]) == 3

    def counting(model, windows, **kw):
        calls.append(1)
        return score_perplexity(model, windows, **kw)

    calls.clear()
    runner.run_eval(recipe, out, resume=True, lm=lm, progress=False, scorer=counting)
    assert len(calls) == 3  # 6 cells, 3 of them finished before the crash
    assert len(json.loads((out / "results.json").read_text())["perplexity"]) == 6

    calls.clear()
    runner.run_eval(make_recipe(tiny_model_dir, tiny_corpus, lengths=[32, 128, 96]), out, resume=True, lm=lm,
                    progress=False, scorer=counting)
    assert len(calls) == 3  # only the new length
    calls.clear()
    runner.run_eval(make_recipe(tiny_model_dir, tiny_corpus, documents=3), out, resume=True, lm=lm, progress=False,
                    scorer=counting)
    assert len(calls) == 6  # other windows: nothing is reused
    calls.clear()
    runner.run_eval(make_recipe(tiny_model_dir, tiny_corpus, documents=3), out, resume=False, lm=lm, progress=False,
                    scorer=counting)
    assert len(calls) == 6  # without --resume everything is recomputed


def reference_sliding(model, tokens: torch.Tensor, length: int, stride: int) -> tuple[float, list[int]]:
    """Independent brute force: full logits per window; returns the NLL sum and how often each token was scored."""
    n = tokens.shape[0]
    seen = [0] * n
    total = 0.0
    starts = list(range(0, n - length + 1, stride))
    if starts[-1] + length < n:
        starts.append(n - length)
    done = 1
    for start in starts:
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens[start:start + length].view(1, -1)).logits[0].float(), -1)
        for pos in range(max(done, start + 1), start + length):
            total -= float(logp[pos - start - 1, tokens[pos]])
            seen[pos] += 1
        done = start + length
    return total, seen


@pytest.mark.parametrize("length,stride", [(32, 16), (32, 7), (32, 32), (100, 10)])
def test_sliding_window_counts_each_token_once(lm, length, stride):
    torch.manual_seed(0)
    tokens = torch.randint(0, lm.model.config.vocab_size, (100,))
    nll, count = sliding.sliding_nll(lm.model, tokens, length, stride, chunk=13)
    # stride = length would never predict a window's first token: the documented cap is length - 1
    ref, seen = reference_sliding(lm.model, tokens, length, min(stride, length - 1))
    assert count == 99 and seen[1:] == [1] * 99 and seen[0] == 0
    assert nll == pytest.approx(ref, rel=1e-4)


def test_sliding_with_one_window_is_truncated_perplexity(lm):
    torch.manual_seed(1)
    tokens = torch.randint(0, lm.model.config.vocab_size, (64,))
    assert sliding.sliding_nll(lm.model, tokens, 64, 32) == pytest.approx(window_nll(lm.model, tokens.view(1, -1)))


def test_sliding_mode_in_run_eval(lm, tiny_model_dir, tiny_corpus, tmp_path):
    recipe = make_recipe(tiny_model_dir, tiny_corpus, mode="sliding", lengths=[32], sliding_tokens=96, methods=["none"])
    results = json.loads(runner.run_eval(recipe, tmp_path, lm=lm, progress=False).artifact.read_text())
    (cell,) = results["perplexity"]
    assert cell["tokens"] == 2 * 95 and results["provenance"]["data"]["windows"]["32"]["stride"] == 16


def test_same_text_mode_scores_the_same_tokens_at_every_length(lm, tiny_model_dir, tiny_corpus, tmp_path):
    recipe = make_recipe(tiny_model_dir, tiny_corpus, mode="same-text", lengths=[33, 65, 129], documents=2,
                         methods=["none"])
    results = json.loads(runner.run_eval(recipe, tmp_path, lm=lm, progress=False).artifact.read_text())
    cells = {c["length"]: c for c in results["perplexity"]}
    assert {n: c["windows"] for n, c in cells.items()} == {33: 8, 65: 4, 129: 2}
    assert {c["tokens"] for c in cells.values()} == {2 * 128}  # every text token predicted once at each length
    assert results["provenance"]["data"]["mode"] == "same-text"


def test_factor_file_labels_and_short_factor_switch(lm, tmp_path):
    pairs = lm.layout.pairs
    (tmp_path / "a" / "run-2k").mkdir(parents=True)
    both = FactorSet(long_factor=ramp_factors(pairs, 4.0), short_factor=[1.0] * pairs)
    both.save(tmp_path / "a" / "run-2k" / "factors.json", lm.layout)
    both.save(tmp_path / "hand.json", lm.layout)
    (tmp_path / "b" / "run-2k").mkdir(parents=True)
    both.save(tmp_path / "b" / "run-2k" / "factors.json", lm.layout)
    methods = eval_methods.resolve_methods(["none", "YaRN", str(tmp_path / "a" / "run-2k" / "factors.json"),
                                      str(tmp_path / "hand.json"), str(tmp_path / "b" / "run-2k" / "factors.json")],
                                     lm.layout)
    assert [m.label for m in methods] == ["none", "yarn", "run-2k", "hand", "run-2k-2"]
    # the long/short pair switches at the original window inside the rotary module, as transformers does
    from longrope_cli.rope.baselines import none_factors
    from longrope_cli.rope.rotary import install_factors, remove_factors

    torch.manual_seed(2)
    short_ids = torch.randint(0, lm.model.config.vocab_size, (1, ORIGINAL))
    long_ids = torch.randint(0, lm.model.config.vocab_size, (1, ORIGINAL + 1))
    try:
        install_factors(lm.model, methods[3].factors_at(lm.layout, 1024), lm.layout)
        file_short, file_long = window_nll(lm.model, short_ids), window_nll(lm.model, long_ids)
        install_factors(lm.model, none_factors(lm.layout, 1024), lm.layout)
        assert file_short == pytest.approx(window_nll(lm.model, short_ids))
        assert file_long[0] != pytest.approx(window_nll(lm.model, long_ids)[0])
    finally:
        remove_factors(lm.model)


def test_bad_method_names_are_one_line_errors(lm, tmp_path):
    with pytest.raises(RecipeError, match="unknown method 'yran': did you mean 'yarn'"):
        eval_methods.check_method_names(["none", "yran"])
    with pytest.raises(FactorFileError, match="not found"):
        eval_methods.check_method_names(["missing/factors.json"])
    with pytest.raises(RecipeError, match="twice"):
        eval_methods.resolve_methods(["pi", "pi"], lm.layout)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"long_factor": [1.0] * 3}))
    with pytest.raises(FactorFileError, match="frequency pairs"):
        eval_methods.resolve_methods([str(other)], lm.layout)


def test_cli_bad_method_exits_2_with_one_line(tiny_model_dir, tmp_path):
    from longrope_cli.cli.evaluate import evaluate

    result = CliRunner().invoke(evaluate, ["--model", str(tiny_model_dir), "--methods", "none,ntk2",
                                           "--out", str(tmp_path / "e")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: unknown method 'ntk2': did you mean 'ntk'? use none, pi, ntk, dynamic-ntk, yarn or a "
                     "factor file (.json / .csv)"]


def test_passkey_length_too_short_is_refused(lm, tiny_model_dir, tiny_corpus, tmp_path):
    with pytest.raises(RecipeError, match="eval.passkey_lengths: length 16 is too short"):
        runner.run_eval(make_recipe(tiny_model_dir, tiny_corpus, passkey_lengths=[16]), tmp_path, lm=lm,
                        progress=False)


def test_plots_from_a_partial_results_document(tmp_path):
    results = {
        "original_length": 64, "lengths": [64, 128, 256], "passkey_lengths": [64],
        "methods": [{"label": "none", "factors_at": 256, "factors": {"long_factor": [1.0] * 4, "short_factor": None}},
                    {"label": "f", "factors_at": 256, "factors": {"long_factor": [1, 2, 3, 4], "short_factor": [1] * 4}}],
        "perplexity": [{"method": "none", "length": 64, "perplexity": 10.0},
                       {"method": "none", "length": 128, "perplexity": "inf"}],
        "passkey": [{"method": "none", "length": 64, "depth": 0.5, "trials": 2, "correct": 1, "accuracy": 0.5}],
    }
    paths = write_plots(results, tmp_path)
    assert [p.name for p in paths] == list(PLOTS)
    assert all(p.stat().st_size < 200_000 for p in paths)

"""LongRoPE2's needle-driven fitness: the prompt layout, the answer-only loss, and a search that uses it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from longrope_cli.evaluate.perplexity import score_perplexity
from longrope_cli.models import load_model
from longrope_cli.recipe import load_recipe
from longrope_cli.search.needle import needle_windows
from longrope_cli.stages.search import run_search


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def test_needle_windows_keep_the_length_and_score_only_the_answer(lm):
    windows = torch.randint(3, 300, (4, 200), generator=torch.Generator().manual_seed(0))
    windows[:, 0] = lm.tokenizer.bos_token_id
    ids, labels = needle_windows(windows, lm.tokenizer, seed=0)
    assert ids.shape == labels.shape == windows.shape
    depths = []
    for k in range(4):
        scored = (labels[k] != -100).nonzero().flatten().tolist()
        answer = lm.tokenizer.decode(ids[k, scored[0] + 1:]).strip()
        assert scored == list(range(200 - 1 - len(scored), 199)) and labels[k, scored].tolist() == ids[k, -len(scored):].tolist()
        key = answer.rstrip(".")
        assert len(key) == 7 and key.isdigit()
        text = lm.tokenizer.decode(ids[k])
        assert text.count(key) == 3  # twice in the needle, once as the answer
        depths.append(text.index("special magic number is " + key) / len(text))
    assert depths == sorted(depths)  # stratified: window k's needle sits in the k-th quarter of the depths
    assert ids[:, 0].tolist() == [lm.tokenizer.bos_token_id] * 4


def test_answer_only_perplexity_is_the_mean_nll_of_the_answer(lm):
    windows = torch.randint(3, 300, (2, 200), generator=torch.Generator().manual_seed(1))
    ids, labels = needle_windows(windows, lm.tokenizer, seed=3)
    result = score_perplexity(lm.model, ids, labels=labels)
    with torch.no_grad():
        logits = lm.model(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, :-1].reshape(-1),
                                            ignore_index=-100)
    assert result.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-4)
    assert result.tokens == int((labels != -100).sum())


def test_a_search_with_the_needle_fitness(lm, tiny_model_dir, tiny_corpus, tmp_path):
    recipe = load_recipe(None, [f"model.name={tiny_model_dir}", "model.device=cpu", f"data.corpus={tiny_corpus}",
                                "search.target=256", "search.population=6", "search.survivors=3",
                                "search.mutations=2", "search.crossovers=2", "search.iterations=1",
                                "search.documents=2", "search.fitness=needle", "search.start_tokens=0"])
    result = run_search(recipe, tmp_path, lm=lm, progress=False)
    assert math.isfinite(result.best_perplexity)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["fingerprint"]["fitness"] == "needle"

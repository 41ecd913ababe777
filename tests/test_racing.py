"""Racing is sound: it stops only candidates that provably cannot survive, so a raced search keeps exactly the
survivors of an unraced one while running fewer window forwards."""

from __future__ import annotations

import math

import torch

from conftest import tiny_llama
from longrope_cli.evaluate.perplexity import PerplexityResult
from longrope_cli.rope.factors import FactorSet
from longrope_cli.rope.layout import layout_from_config
from longrope_cli.rope.rotary import installed_factors
from longrope_cli.search.engine import Engine, EvolutionSettings, Problem
from longrope_cli.search.evaluator import LocalEvaluator
from longrope_cli.search.evolution import SearchSpace

WINDOWS = 5


class TableEvaluator(LocalEvaluator):
    """Per-window perplexity from a known function of the installed factors; counts window forwards."""

    def __init__(self, model, layout, nll_of):
        super().__init__(model, layout, torch.zeros(WINDOWS, 8, dtype=torch.long))
        self.nll_of = nll_of
        self.forwards = 0
        self._row = 0

    def _group(self, group, limits):
        self._row = 0
        return super()._group(group, limits)

    def _window(self, window, labels=None):
        self.forwards += 1
        nll = self.nll_of(installed_factors(self.model).long_factor, self._row)
        self._row += 1
        return PerplexityResult(math.exp(nll), nll, 1, [math.exp(nll)])


def test_a_child_that_recovers_after_a_bad_first_window_is_not_stopped():
    """The issue's case: 10.1 on window 1 and 8 on the rest, against a worst survivor at 10 everywhere. The old
    rule (running perplexity above the survivor's after any window) stopped it; it would have survived."""
    model = tiny_llama()
    layout = layout_from_config(model.config)
    child = FactorSet(long_factor=(2.0,) * layout.pairs)
    table = TableEvaluator(model, layout, lambda lam, k: math.log(10.1 if k == 0 else 8.0))
    settings = EvolutionSettings(racing=True)
    engine = Engine.__new__(Engine)
    engine.settings = settings
    worst = type("S", (), {"complete": True, "value": 10.0, "per_window": (10.0,) * WINDOWS})()
    state = type("St", (), {"parents": ["w"] * settings.survivors, "cache": {"w": worst}})()
    fit = table.score(child, stop_above=engine._threshold(state))
    assert fit.complete and fit < 10.0


def _search(racing: bool, tmp_path):
    model = tiny_llama()
    layout = layout_from_config(model.config)
    space = SearchSpace(pairs=layout.pairs, factor_min=1.0, factor_max=4.0, step=0.25)
    optimum = [1.0 + 3.0 * i / (layout.pairs - 1) for i in range(layout.pairs)]

    def nll_of(lam, k):
        # smooth bowl around `optimum`; window 0 punishes large factors hard (a catastrophic first window)
        distance = sum((a - b) ** 2 for a, b in zip(lam, optimum, strict=True)) / len(lam)
        return 3.0 + distance + 0.05 * k + (40.0 * distance if k == 0 else 0.0)

    evaluator = TableEvaluator(model, layout, nll_of)
    seeds = [(space.snap([1.0] * layout.pairs), "none"), (space.snap([4.0] * layout.pairs), "pi")]
    problem = Problem(space=space, seeds=seeds, fingerprint={"test": racing},
                      to_factors=lambda c: FactorSet(long_factor=space.values(c)))
    settings = EvolutionSettings(population=12, survivors=4, mutations=6, crossovers=6, iterations=6, seed=3,
                                 racing=racing)
    outcome = Engine(problem, settings, evaluator, tmp_path / str(racing), progress=False).run()
    return outcome, evaluator.forwards


def test_racing_keeps_the_unraced_survivors_with_fewer_forwards(tmp_path):
    plain, plain_forwards = _search(False, tmp_path)
    raced, raced_forwards = _search(True, tmp_path)
    assert raced.state.parents == plain.state.parents  # no regret: the same survivors, generation after generation
    assert raced.best_score.value == plain.best_score.value
    assert raced.state.counters["raced"] > 0 and raced_forwards < plain_forwards

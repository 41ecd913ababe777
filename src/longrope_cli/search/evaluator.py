"""Fitness backends: `scores = evaluator.evaluate(factor_sets)`, one perplexity per factor set.

- `LocalEvaluator`: one process, the model loaded once; per candidate only the rotary tables change
  (`install_factors`), then `score_perplexity` runs the fixed windows (one forward each, no KV cache,
  loss in chunks).
- `DistributedEvaluator`: torch.distributed (torchrun or srun). Rank 0 runs the evolution and
  broadcasts each batch of candidates; candidate j is scored by rank j mod world on its own full copy
  of the model; results are gathered on rank 0. gloo on CPU, NCCL on GPU (`parallel.dist_backend`).

Scores are `Fitness` floats (a perplexity, inf when it was NaN or overflowed) that also say whether
every window was scored (`complete`; racing may stop early), how many windows ran, and the seconds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from longrope_cli.evaluate.perplexity import PerplexityResult, score_perplexity
from longrope_cli.numbers import perplexity_from_nll
from longrope_cli.rope.factors import FactorSet
from longrope_cli.rope.layout import RopeLayout
from longrope_cli.rope.rotary import install_factors, installed_factors, remove_factors

log = logging.getLogger(__name__)


class Fitness(float):
    """A candidate's perplexity (lower is better; inf = failed) plus how it was obtained."""

    complete: bool
    windows: int
    seconds: float
    per_window: tuple[float, ...]

    def __new__(cls, value: float, complete: bool = True, windows: int = 0, seconds: float = 0.0,
                per_window: Sequence[float] = ()) -> Fitness:
        value = float(value)
        obj = super().__new__(cls, value if math.isfinite(value) else math.inf)
        obj.complete = bool(complete)
        obj.windows = int(windows)
        obj.seconds = float(seconds)
        obj.per_window = tuple(float(v) for v in per_window)
        return obj

    def __reduce__(self):
        return (Fitness, (float(self), self.complete, self.windows, self.seconds, self.per_window))

    def __repr__(self) -> str:
        tag = "" if self.complete else ", raced"
        return f"Fitness({float(self):.4f}{tag})"


Limit = float | Sequence[float] | None
"""Racing limit: a perplexity, or one per window prefix (the running perplexity of the survivor to beat)."""


class Evaluator:
    """Scores factor sets. `parallelism`: how many candidates one call scores at once (batch them so)."""

    parallelism: int = 1

    def evaluate(self, factor_sets: Sequence[FactorSet], stop_above: Limit = None) -> list[Fitness]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the evaluator changed (the model's rotary modules)."""


def _as_groups(windows: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(windows, torch.Tensor):
        return [windows]
    groups = list(windows)
    if not groups:
        raise ValueError("no windows to score")
    return groups


class LocalEvaluator(Evaluator):
    """In-process fitness: perplexity of fixed windows with each candidate's factors installed.

    `windows` is one (N, L) tensor, or several (readjust: one per length), in which case the fitness is the
    mean of the groups' perplexities. Racing (`stop_above`) applies to a single group: scoring stops after the
    first window whose running perplexity exceeds the limit for that many windows (a number, or one limit
    per prefix: the running perplexity of the survivor to beat on the same windows).
    """

    def __init__(self, model: Any, layout: RopeLayout, windows: torch.Tensor | Sequence[torch.Tensor],
                 chunk: int = 1024, labels: torch.Tensor | None = None, scoring: str = "auto",
                 scorer: Any = score_perplexity, context: Any = None) -> None:
        self.model = model
        self.context = context  # context_parallel.ContextGroup: its ranks score each window together
        self.scorer = scorer  # evaluate.perplexity.score_perplexity, or a caller's wrapper of it
        self.scoring = scoring  # evaluate.perplexity.decoder_hidden: auto, layerwise or standard
        self.layout = layout
        self.groups = _as_groups(windows)
        self.chunk = chunk
        # Per-token targets of a single group (the needle fitness scores only the answer); None = every token.
        self.labels = labels
        self._previous = installed_factors(model)
        self._installed = False

    @property
    def windows(self) -> int:
        return sum(len(g) for g in self.groups)

    def _group(self, group: torch.Tensor, limits: Sequence[float] | None) -> tuple[float, list[float], bool]:
        """(perplexity, per-window perplexities, complete) of one group, window by window so racing can stop it
        after any window whose running perplexity exceeds that prefix's limit."""
        nll, tokens, per_window = 0.0, 0, []
        for k in range(len(group)):
            labels = None if self.labels is None or len(self.groups) > 1 else self.labels[k:k + 1]
            result = self._window(group[k:k + 1], labels)
            per_window.append(result.perplexity)
            if not result.finite:
                return math.inf, per_window, k == len(group) - 1
            nll += result.nll * result.tokens
            tokens += result.tokens
            running = perplexity_from_nll(nll / tokens)
            if limits is not None and k < len(group) - 1 and running > limits[min(k, len(limits) - 1)]:
                return running, per_window, False
        return perplexity_from_nll(nll / tokens), per_window, True

    def _window(self, window: torch.Tensor, labels: torch.Tensor | None = None) -> PerplexityResult:
        """One window's perplexity with the installed factors."""
        extra = {} if self.context is None else {"context": self.context}  # a caller's scorer may not take it
        return self.scorer(self.model, window, chunk=self.chunk, labels=labels, scoring=self.scoring, **extra)

    def score(self, factors: FactorSet, stop_above: Limit = None) -> Fitness:
        started = time.perf_counter()
        install_factors(self.model, factors, self.layout)
        self._installed = True
        limits = None
        if stop_above is not None and len(self.groups) == 1:
            limits = [float(stop_above)] if isinstance(stop_above, int | float) else [float(v) for v in stop_above]
        values, per_window, complete = [], [], True
        for group in self.groups:
            value, windows, done = self._group(group, limits)
            values.append(value)
            per_window += windows
            if not done or not math.isfinite(value):
                complete = done
                break  # raced, or NaN / inf: the candidate loses whatever the other groups would say
        value = sum(values) / len(values) if all(math.isfinite(v) for v in values) else math.inf
        return Fitness(value, complete=complete, windows=len(per_window), seconds=time.perf_counter() - started,
                       per_window=per_window)

    def evaluate(self, factor_sets: Sequence[FactorSet], stop_above: Limit = None) -> list[Fitness]:
        return [self.score(fs, stop_above) for fs in factor_sets]

    def close(self) -> None:
        """Put back what was installed before the search (or transformers' own rotary module)."""
        if not self._installed:
            return
        if self._previous is None:
            remove_factors(self.model)
        else:
            install_factors(self.model, self._previous, self.layout)
        self._installed = False


class DistributedEvaluator(Evaluator):
    """Every rank holds a full model copy and scores whole candidates; rank 0 drives.

    Rank 0 calls `evaluate` (and finally `shutdown(payload)`); every other rank calls `serve()`, which scores
    its share of each batch until rank 0 shuts down and then returns rank 0's payload. Under context parallel
    (`local.context`, C ranks per group) the candidates are dealt to the groups, and the C ranks of a group
    score theirs together.
    """

    def __init__(self, local: LocalEvaluator, pools: dict[str, LocalEvaluator] | None = None) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("DistributedEvaluator needs an initialised process group (init_distributed)")
        self.dist = dist
        self.local = local
        # Other window sets every rank can score on (the search's fresh validation windows): rank 0 names one.
        self.pools = {"fitness": local, **(pools or {})}
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        context = local.context
        self.share_size = 1 if context is None else context.size  # ranks per candidate
        self.share = self.rank // self.share_size  # which share of each batch this rank scores
        self.parallelism = self.world // self.share_size
        self.scored = 0  # candidates this rank scored

    def _share(self, factor_sets: Sequence[FactorSet], stop_above: Limit, pool: str = "fitness"
               ) -> list[tuple[int, Fitness]]:
        scorer = self.pools[pool]
        mine = [(j, scorer.score(factor_sets[j], stop_above))
                for j in range(self.share, len(factor_sets), self.parallelism)]
        self.scored += len(mine)
        return mine if self.rank % self.share_size == 0 else []  # a group's ranks hold the same scores

    def _round(self, message: tuple) -> list[list[tuple[int, Fitness]]] | None:
        box = [message]
        self.dist.broadcast_object_list(box, src=0)
        kind, factor_sets, stop_above, pool = box[0]
        if kind == "stop":
            return None
        mine = self._share(factor_sets, stop_above, pool)
        gathered: list[Any] = [None] * self.world if self.rank == 0 else None
        self.dist.gather_object(mine, gathered, dst=0)
        return gathered

    def evaluate(self, factor_sets: Sequence[FactorSet], stop_above: Limit = None, pool: str = "fitness"
                 ) -> list[Fitness]:
        if self.rank != 0:
            raise RuntimeError("only rank 0 calls evaluate(); other ranks call serve()")
        gathered = self._round(("score", list(factor_sets), stop_above, pool))
        out: list[Fitness | None] = [None] * len(factor_sets)
        for part in gathered or []:
            for j, fit in part:
                out[j] = fit
        assert all(f is not None for f in out), "a rank returned no score"
        return out  # type: ignore[return-value]

    def serve(self) -> Any:
        """Score this rank's share of every batch until rank 0 calls `shutdown`; return its payload."""
        while True:
            box: list[Any] = [None]
            self.dist.broadcast_object_list(box, src=0)
            kind, payload, stop_above, pool = box[0]
            if kind == "stop":
                log.info("rank %d of %d: scored %d candidates", self.rank, self.world, self.scored)
                return payload
            mine = self._share(payload, stop_above, pool)
            self.dist.gather_object(mine, None, dst=0)

    def shutdown(self, payload: Any = None) -> None:
        """Rank 0: release the other ranks from `serve()`, handing them `payload`."""
        if self.rank == 0:
            self.dist.broadcast_object_list([("stop", payload, None, None)], src=0)

    def close(self) -> None:
        for scorer in self.pools.values():
            scorer.close()


class PoolEvaluator(Evaluator):
    """One named window set of a `DistributedEvaluator`, as an Evaluator (rank 0 only)."""

    def __init__(self, distributed: DistributedEvaluator, pool: str) -> None:
        self.distributed = distributed
        self.pool = pool
        self.parallelism = distributed.parallelism

    def evaluate(self, factor_sets: Sequence[FactorSet], stop_above: Limit = None) -> list[Fitness]:
        return self.distributed.evaluate(factor_sets, stop_above, pool=self.pool)

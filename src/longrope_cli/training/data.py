"""Training windows at the target length, in an order that is a pure function of (seed, step).

The windows are the ones `data.make_windows` cuts (BOS first, non-overlapping, round-robin across the
train split's documents), but indexed lazily: at 128k tokens the paper's 400 x 32 windows would be
13 GiB of int64 ids per rank if materialised; here only the token documents are held.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from longrope_cli.data import make_windows


class WindowIndex:
    """Window k of the train split, in `make_windows`' order, cut on demand."""

    def __init__(self, token_docs: Sequence[np.ndarray], length: int, bos_id: int | None, windows_per_doc: int = 0,
                 limit: int | None = None) -> None:
        self.docs = token_docs
        self.length = length
        self.bos_id = bos_id
        self.body = length - (1 if bos_id is not None else 0)
        self.spans: list[tuple[int, int]] = []  # (document, start)
        fits = [len(doc) // self.body for doc in token_docs]
        rounds = max(fits, default=0) if not windows_per_doc else min(windows_per_doc, max(fits, default=0))
        for round_index in range(rounds):
            for doc_index, n in enumerate(fits):
                if round_index < n:
                    self.spans.append((doc_index, round_index * self.body))
                    if limit is not None and len(self.spans) >= limit:
                        return
        if not self.spans:
            make_windows(list(token_docs), length, 1, bos_id, windows_per_doc, "train")  # raises its one-line error

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, index: int) -> torch.Tensor:
        doc, start = self.spans[index]
        window = np.asarray(self.docs[doc][start:start + self.body], dtype=np.int64)
        if self.bos_id is not None:
            window = np.concatenate([[self.bos_id], window])
        return torch.from_numpy(window)

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([self[i] for i in indices])


class WindowOrder:
    """The global batch of every step: a fresh seeded permutation per pass over the windows.

    Step `s` trains on samples s * batch .. (s + 1) * batch - 1 of the endless shuffled stream, so a run
    resumed at step `s` sees exactly the batches the uninterrupted run would, on any number of ranks.
    A data-parallel rank takes every dp_world-th sample of the batch.
    """

    def __init__(self, windows: int, batch_size: int, seed: int) -> None:
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.windows, generator=gen)}  # keep one pass in memory
        return self._perms[epoch]

    def batch(self, step: int) -> list[int]:
        out = []
        for sample in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(sample, self.windows)
            out.append(int(self._perm(epoch)[offset]))
        return out

    def shard(self, step: int, dp_rank: int = 0, dp_world: int = 1) -> list[int]:
        return self.batch(step)[dp_rank::dp_world]

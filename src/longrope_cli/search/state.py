"""Checkpoint and log of a search, so that a run killed at any moment resumes to the same result.

- `state.json`, rewritten atomically after every generation: the survivors, every score so far (the
  cache), the RNG state, the generation, counters, history and a fingerprint of everything that makes
  scores comparable (model, windows, target, grid, seeds, ...). A resume with another fingerprint is
  refused.
- `candidates.jsonl`, one line per scored candidate, appended and fsync'ed as soon as it is scored. On
  resume the lines written after the last checkpoint refill the cache, so the replayed generation does
  not score them again; a torn last line (killed mid-write) is dropped and cut off the file.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longrope_cli.errors import RecipeError
from longrope_cli.numbers import json_number, read_number
from longrope_cli.outputs import atomic_write_json, strict_json
from longrope_cli.search.evolution import Candidate

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
LOG_FILE = "candidates.jsonl"
STATE_FORMAT = "longrope-search-state"
STATE_VERSION = 1


@dataclass
class Scored:
    """One cache entry: a candidate's score and where it came from."""

    value: float
    complete: bool = True
    generation: int = 0
    origin: str = ""
    windows: int = 0
    seconds: float = 0.0
    per_window: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"perplexity": json_number(self.value), "complete": self.complete, "generation": self.generation,
                "origin": self.origin, "windows": self.windows, "seconds": round(self.seconds, 4),
                "per_window": [json_number(v) for v in self.per_window]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scored:
        return cls(value=read_number(data["perplexity"]), complete=bool(data.get("complete", True)),
                   generation=int(data.get("generation", 0)), origin=str(data.get("origin", "")),
                   windows=int(data.get("windows", 0)), seconds=float(data.get("seconds", 0.0)),
                   per_window=tuple(read_number(v) for v in data.get("per_window", ())))




@dataclass
class SearchState:
    """Everything a search needs to continue exactly where it stopped."""

    fingerprint: dict[str, Any]
    generation: int = -1  # last completed generation; -1 = not even the initial population
    rng: dict[str, Any] | None = None
    parents: list[Candidate] = field(default_factory=list)
    cache: dict[Candidate, Scored] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=lambda: {
        "requested": 0, "cache_hits": 0, "duplicates": 0, "raced": 0, "windows": 0, "eval_seconds": 0.0})
    elapsed: float = 0.0
    stalled: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None

    @property
    def evaluations(self) -> int:
        """Candidates scored so far (each one once: the cache)."""
        return len(self.cache)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "generation": self.generation,
            "rng": self.rng,
            "parents": [c.to_json() for c in self.parents],
            "cache": [[*c.to_json(), s.to_json()] for c, s in self.cache.items()],
            "counters": self.counters,
            "elapsed": self.elapsed,
            "stalled": self.stalled,
            "history": self.history,
            "stopped": self.stopped,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchState:
        return cls(
            fingerprint=data["fingerprint"],
            generation=int(data["generation"]),
            rng=data.get("rng"),
            parents=[Candidate.from_json(c) for c in data.get("parents", [])],
            cache={Candidate.from_json(row[:2]): Scored.from_json(row[2]) for row in data.get("cache", [])},
            counters=dict(data.get("counters", {})),
            elapsed=float(data.get("elapsed", 0.0)),
            stalled=int(data.get("stalled", 0)),
            history=list(data.get("history", [])),
            stopped=data.get("stopped"),
        )


def save_state(out_dir: Path, state: SearchState) -> None:
    atomic_write_json(Path(out_dir) / STATE_FILE, state.to_json())


def load_state(out_dir: Path, fingerprint: dict[str, Any]) -> SearchState | None:
    """The checkpoint in `out_dir` (None if there is none), refused if it was made by a different search."""
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise RecipeError(f"{path} is unreadable; remove it (or the folder) and search again") from None
    if data.get("format") != STATE_FORMAT or int(data.get("version", 0)) > STATE_VERSION:
        raise RecipeError(f"{path} is not a search checkpoint this longrope can read; use a new --out")
    saved = data.get("fingerprint", {})
    changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if changed:
        raise RecipeError(
            f"{out_dir} holds a search made with different settings ({', '.join(changed)}); resume with the "
            "same recipe, or pass another --out")
    return SearchState.from_json(data)


def clean_partial_files(out_dir: Path) -> None:
    """Remove temporary files of atomic writes that a kill interrupted."""
    for tmp in Path(out_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


class CandidateLog:
    """`candidates.jsonl`: every scored candidate, appended and flushed to disk at once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        """All complete records; a torn last line is dropped and cut off the file."""
        if not self.path.is_file():
            return []
        raw = self.path.read_bytes()
        records, good_end, pos = [], 0, 0
        for line in raw.splitlines(keepends=True):
            pos += len(line)
            if not line.endswith(b"\n"):
                break  # torn: the writer was killed mid-line
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_end = pos
        if good_end < len(raw):
            log.warning("%s: dropping a torn last record (the search was killed while writing it)", self.path)
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)
        return records

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        text = "".join(json.dumps(strict_json(r), separators=(",", ":"), allow_nan=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)


def log_record(candidate: Candidate, scored: Scored, values: tuple[float, ...], number: int) -> dict[str, Any]:
    """One JSONL line: the candidate (grid indices and values), its score and how it was obtained."""
    return {"n": number, "idx": list(candidate.idx), "start_tokens": candidate.start, "factors": list(values),
            **scored.to_json()}


def record_candidate(record: dict[str, Any]) -> tuple[Candidate, Scored]:
    return Candidate(tuple(int(i) for i in record["idx"]), int(record["start_tokens"])), Scored.from_json(record)

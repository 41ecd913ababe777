"""The eval's unit of work: one (kind, method, length) cell, stored on disk once finished.

Each finished cell is written atomically to `cells/<kind>__<method>__<length>.json` with a fingerprint of
what it scored (factors, windows, model, settings); a resume reuses every cell whose fingerprint still
matches.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from longrope_cli.evaluate.methods import slug
from longrope_cli.outputs import atomic_write_json

log = logging.getLogger(__name__)

CELLS_DIR = "cells"


class CellStore:
    """Finished cells on disk, one JSON file each, reused on resume only if their fingerprint matches."""

    def __init__(self, out_dir: Path, resume: bool) -> None:
        self.dir = out_dir / CELLS_DIR
        if not resume and self.dir.is_dir():
            for old in self.dir.glob("*.json"):
                old.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.reused = 0
        self.computed = 0

    def path(self, kind: str, label: str, length: int) -> Path:
        return self.dir / f"{kind}__{slug(label)}__{length}.json"

    def get(self, kind: str, label: str, length: int, fingerprint: str) -> dict[str, Any] | None:
        path = self.path(kind, label, length)
        if not path.is_file():
            return None
        try:
            cell = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # a cell is written atomically, but a hand-edited one is simply recomputed
        if cell.get("fingerprint") != fingerprint:
            log.warning("%s: settings changed since it was scored; recomputing", path.name)
            return None
        self.reused += 1
        return cell

    def put(self, kind: str, label: str, length: int, cell: dict[str, Any]) -> None:
        atomic_write_json(self.path(kind, label, length), cell)
        self.computed += 1


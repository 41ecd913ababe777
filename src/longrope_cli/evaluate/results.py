"""results.json: the document `longrope eval` writes and `report` reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from longrope_cli.errors import LongRopeError
from longrope_cli.evaluate.methods import EvalMethod, factor_summary
from longrope_cli.rope.layout import RopeLayout

RESULTS_FORMAT = "longrope-eval"
RESULTS_VERSION = 1
RESULTS_FILE = "results.json"


def results_document(provenance: dict[str, Any], methods: list[EvalMethod], layout: RopeLayout, lengths: list[int],
                      passkey_lengths: list[int], ppl_cells: list[dict[str, Any]],
                      passkey_cells: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
    """The results.json document: provenance, methods with their factors, and one entry per cell."""
    largest = max(lengths + passkey_lengths)
    method_rows = []
    for method in methods:
        factors = method.factors_at(layout, largest)
        method_rows.append({"label": method.label, "kind": method.kind, "source": method.source,
                            "factors_at": largest, "factors": factor_summary(factors)})
    strip = ("fingerprint", "kind")
    passkey = []
    for c in passkey_cells:
        for d in c["depths"]:
            passkey.append({"method": c["method"], "length": c["length"], **d})
    return {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "complete": complete,
        "provenance": provenance,
        "original_length": layout.original_length,
        "lengths": lengths,
        "passkey_lengths": passkey_lengths,
        "methods": method_rows,
        "perplexity": [{k: v for k, v in c.items() if k not in strip} for c in ppl_cells],
        "passkey": passkey,
        "passkey_seconds": [{"method": c["method"], "length": c["length"], "seconds": c["seconds"]}
                            for c in passkey_cells],
    }


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results.json written by `run_eval` (a folder holding one is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LongRopeError(f"cannot read eval results {str(path)!r}: {err}") from None
    if data.get("format") != RESULTS_FORMAT:
        raise LongRopeError(f"{path}: not a longrope eval results file (format {data.get('format')!r})")
    return data


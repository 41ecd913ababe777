"""Numbers every stage shares: perplexity from NLL, JSON's missing infinity, and short content digests."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

MAX_NLL = 700.0  # exp(700) is near float64's limit: a mean NLL above it is an infinite perplexity


def perplexity_from_nll(mean_nll: float) -> float:
    """exp(mean NLL), inf once it would overflow (or when the NLL is NaN / inf)."""
    return math.exp(mean_nll) if mean_nll < MAX_NLL else math.inf


def json_number(value: float) -> float | str:
    """JSON has no infinity or NaN: they are written as the strings "inf", "-inf" and "nan"."""
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def read_number(value: float | str) -> float:
    """The inverse of `json_number`."""
    return float(value)  # float("inf"), float("-inf") and float("nan") read the strings back


def digest(data: Any, length: int = 16) -> str:
    """A short SHA-1 of `data` as canonical JSON: equal settings, equal digest."""
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:length]

"""Context lengths written the way people say them: 4096, 4k, 256k, 2048k, 2m (k = 1024, m = 1024**2)."""

from __future__ import annotations

import re

from longrope_cli.errors import RecipeError

_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")
_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}


def parse_length(value: int | str, key: str = "length") -> int:
    """Parse `4096`, `"4k"`, `"256k"`, `"2m"` into a token count; raise a one-line `RecipeError` otherwise."""
    if isinstance(value, bool):
        raise RecipeError(f"{key}: expected a length like 4096, 4k or 256k, got {value!r}")
    if isinstance(value, int):
        number = value
    else:
        match = _LENGTH.match(str(value))
        if not match:
            raise RecipeError(f"{key}: expected a length like 4096, 4k, 256k or 2m, got {value!r}")
        amount = float(match.group(1)) * _UNITS[match.group(2).lower()]
        if amount != int(amount):
            raise RecipeError(f"{key}: {value!r} is not a whole number of tokens")
        number = int(amount)
    if number <= 0:
        raise RecipeError(f"{key}: a length must be positive, got {value!r}")
    return number


def parse_lengths(value: str | int | list, key: str = "lengths") -> list[int]:
    """Parse a comma-separated string or a list of lengths."""
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    lengths = [parse_length(item, key) for item in items if str(item).strip()]
    if not lengths:
        raise RecipeError(f"{key}: give at least one length, e.g. 4k,8k,16k")
    return lengths


def format_length(tokens: int) -> str:
    """The shortest exact spelling: 2097152 -> '2048k', 4096 -> '4k', 300 -> '300'."""
    if tokens % 1024 == 0:
        return f"{tokens // 1024}k"
    return str(tokens)

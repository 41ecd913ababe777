"""Hugging Face folders that every supported transformers loads (setup.cfg: transformers>=4.57, so 4.57 and 5.x).

transformers 5.x calls its generic tokenizer.json-backed class `TokenizersBackend` (`PreTrainedTokenizerFast`
is an alias of it) and `save_pretrained` writes that name as `tokenizer_class`; transformers 4.57 has no such
class, so `AutoTokenizer.from_pretrained` there fails with "Tokenizer class TokenizersBackend does not exist
or is not currently imported". `PreTrainedTokenizerFast` names the same class in both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from longrope_cli.outputs import atomic_write_json

# tokenizer_class written by transformers 5.x -> the name 4.57 and 5.x both resolve to the same class
PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def save_tokenizer(tokenizer: Any, folder: str | Path) -> None:
    """`tokenizer.save_pretrained(folder)`, with a tokenizer_config.json that transformers 4.57 loads too."""
    tokenizer.save_pretrained(folder)
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    portable = PORTABLE_TOKENIZER_CLASSES.get(config.get("tokenizer_class"))
    if portable is not None:
        config["tokenizer_class"] = portable
        atomic_write_json(path, config)

"""The bundled Jargon File corpus: a held-out eval document of another domain than the novels."""

from __future__ import annotations

import pytest

from longrope_cli.data import bundled_corpus_path, load_corpus, load_windows
from longrope_cli.errors import DataError
from longrope_cli.models import load_model
from longrope_cli.recipe import load_recipe


def test_jargon_is_one_long_eval_document():
    corpus = load_corpus("jargon")
    (doc,) = corpus.split("eval")
    assert doc.id == "eval/jargon-file.txt.gz"
    assert len(doc.text) >= 100_000
    assert "The Story of Mel" in doc.text and "zorkmid:" in doc.text
    assert "{" not in doc.text.split("\n\n")[-1]  # cross-reference braces are stripped from prose
    assert not corpus.splits["train"] and not corpus.splits["search"]
    with pytest.raises(DataError, match="split by folder"):
        corpus.split("search")
    assert bundled_corpus_path("jargon").name == "corpus-jargon"


def test_jargon_cuts_eight_2k_eval_windows_with_the_testbed_tokenizer(tmp_path):
    tokenizer = load_model("testbed").tokenizer
    data = load_recipe(None, ["data.corpus=jargon", f"data.cache_dir={tmp_path}"]).data
    windows = load_windows(data, tokenizer, "eval", 2048, 8)
    assert windows.shape == (8, 2048)
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    assert any(tmp_path.rglob("*.npy"))  # tokens were cached under data.cache_dir

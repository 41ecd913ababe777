"""Corpora, splits and windows."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch

from longrope_cli.data import load_corpus, make_windows, split_windows, tokenize_documents
from longrope_cli.errors import DataError


def test_folder_splits_are_disjoint_and_windows_start_with_bos(tiny_corpus, tiny_tokenizer, tmp_path):
    corpus = load_corpus(str(tiny_corpus))
    assert corpus.by_folder and set(corpus.splits) == {"train", "search", "eval"}
    for split in ("train", "search", "eval"):  # each split holds exactly its folder's documents
        files = sorted((tiny_corpus / split).glob("*.txt"))
        assert sorted(d.text for d in corpus.split(split)) == sorted(p.read_text(encoding="utf-8") for p in files)
    texts = {split: {d.text for d in corpus.split(split)} for split in ("train", "search", "eval")}
    assert texts["search"].isdisjoint(texts["eval"]) and texts["train"].isdisjoint(texts["eval"] | texts["search"])
    tokens = tokenize_documents(corpus.split("eval"), tiny_tokenizer, cache_dir=tmp_path)
    windows = make_windows(tokens, 128, 6, tiny_tokenizer.bos_token_id)
    assert windows.shape == (6, 128)
    assert (windows[:, 0] == tiny_tokenizer.bos_token_id).all()
    # round-robin: windows 0..2 are the first window of each document
    for i in range(3):
        assert windows[i, 1:].tolist() == tokens[i][:127].tolist()
    # cached: the second call reads the same tokens back
    again = tokenize_documents(corpus.split("eval"), tiny_tokenizer, cache_dir=tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(tokens, again, strict=True))


def test_windows_per_doc_one_is_the_paper(tiny_corpus, tiny_tokenizer, tmp_path):
    tokens = tokenize_documents(load_corpus(str(tiny_corpus)).split("search"), tiny_tokenizer, cache_dir=tmp_path)
    with pytest.raises(DataError, match="only 3 windows"):
        make_windows(tokens, 64, 4, tiny_tokenizer.bos_token_id, windows_per_doc=1)


def test_no_document_long_enough_says_how_long_the_longest_is():
    with pytest.raises(DataError, match=r"no search-split document has 4k tokens \(longest: 10\)"):
        make_windows([np.arange(10)], 4096, 1, 0)


def test_jsonl_npy_and_hash_split(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        for i in range(200):
            handle.write(json.dumps({"body": f"document {i}"}) + "\n")
    corpus = load_corpus(str(path), text_field="body", search_fraction=0.2, eval_fraction=0.2)
    texts = {split: [d.text for d in corpus.split(split)] for split in ("train", "search", "eval")}
    # every document in exactly one split
    assert sorted(t for split in texts.values() for t in split) == sorted(f"document {i}" for i in range(200))
    # in proportion to the fractions (binomial, within 4 standard deviations)
    for split, share in (("train", 0.6), ("search", 0.2), ("eval", 0.2)):
        assert abs(len(texts[split]) - 200 * share) <= 4 * math.sqrt(200 * share * (1 - share)), (split, texts)
    # deterministic: a second load puts every document in the same split
    again = load_corpus(str(path), text_field="body", search_fraction=0.2, eval_fraction=0.2)
    assert {split: [d.text for d in again.split(split)] for split in texts} == texts
    # a hash of the document, not a draw: a larger eval share only moves documents into eval, never out of it
    more = load_corpus(str(path), text_field="body", search_fraction=0.2, eval_fraction=0.3)
    assert set(texts["eval"]) < {d.text for d in more.split("eval")}
    with pytest.raises(DataError, match="no field 'text'"):
        load_corpus(str(path))
    np.save(tmp_path / "tokens.npy", np.arange(50).reshape(5, 10))
    docs = load_corpus(str(tmp_path / "tokens.npy"), eval_fraction=1.0, search_fraction=0.0).split("eval")
    assert len(docs) == 5 and docs[0].tokens.tolist() == list(range(10))


def test_token_files_are_memory_mapped_and_windows_are_int64(tmp_path, tiny_tokenizer):
    folder = tmp_path / "bins"
    for split in ("train", "eval"):
        (folder / split).mkdir(parents=True)
        np.arange(1000, 1300, dtype=np.uint16).tofile(folder / split / "tokens.bin")
    (doc,) = load_corpus(str(folder)).split("eval")
    assert isinstance(doc.tokens, np.memmap) and doc.tokens.dtype == np.uint16  # not copied into memory
    windows = make_windows(tokenize_documents([doc], tiny_tokenizer), 100, 3, bos_id=7)
    assert windows.dtype == torch.int64 and windows[0, :3].tolist() == [7, 1000, 1001]
    assert windows[2, -1].item() == 1000 + 3 * 99 - 1


def test_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_corpus(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no documents"):
        load_corpus(str(tmp_path / "empty"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    with pytest.raises(DataError, match="cannot read corpus file"):
        load_corpus(str(bad))


def test_bundled_corpus_has_long_held_out_books():
    corpus = load_corpus("testbed")
    assert corpus.split("eval") and corpus.split("search") and corpus.split("train")
    assert all(len(d.text) > 100_000 for d in corpus.split("eval") + corpus.split("search"))


def test_split_windows_cover_the_same_text_at_every_length():
    bos = 7
    spans = make_windows([np.arange(100, 400)], 129, 2, bos)  # two spans of BOS + 128 tokens
    for length in (129, 65, 33, 17):
        windows = split_windows(spans, length, bos)
        assert windows.shape[1] == length and (windows[:, 0] == bos).all()
        assert torch.equal(windows[:, 1:].reshape(-1), spans[:, 1:].reshape(-1))  # same tokens, same order
    with pytest.raises(DataError):
        split_windows(spans, 200, bos)


def test_a_text_found_twice_lands_in_one_split(tmp_path):
    """The split is drawn from the content: a corpus with duplicates never lets the search score what eval reports."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"story {i % 40}"}) + "\n" for i in range(200)), encoding="utf-8")
    corpus = load_corpus(str(path), search_fraction=0.3, eval_fraction=0.3)
    where: dict[str, set[str]] = {}
    for split in ("train", "search", "eval"):
        for doc in corpus.splits.get(split, []):
            where.setdefault(doc.text, set()).add(split)
    assert len(where) == 40 and all(len(splits) == 1 for splits in where.values()), where

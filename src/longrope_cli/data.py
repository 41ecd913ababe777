"""Corpora -> documents -> disjoint train / search / eval splits -> deterministic fixed-length token windows.

Supported sources: a .txt / .txt.gz file (one document), a folder of such files, .jsonl(.gz) and .parquet
(one document per record, `text_field`), a Hugging Face dataset saved with `save_to_disk`, and
pre-tokenised .npy (1-D: one document, 2-D: one per row) or .bin (uint16 token stream) arrays.
A folder with `train/`, `search/` and `eval/` sub-folders (or only some of them, and no other documents than
a README) is split by folder; otherwise each document is assigned to a split by a hash of its id, so a search
never scores the documents that eval reports on. Bundled corpora are addressed by name (BUNDLED_CORPORA):
'testbed' (Austen + Melville, all three splits) and 'jargon' (the Jargon File, an eval split of another domain).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longrope_cli.errors import DataError
from longrope_cli.lengths import format_length
from longrope_cli.models import ASSETS

SPLITS = ("train", "search", "eval")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".md", ".rst")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
TOKEN_SUFFIXES = (".npy", ".bin")
# corpus name -> folder under assets/ (see its README.md)
BUNDLED_CORPORA = {"testbed": "corpus", "jargon": "corpus-jargon"}


@dataclass
class Document:
    """One document: text, or tokens for pre-tokenised corpora."""

    id: str
    text: str | None = None
    tokens: np.ndarray | None = None


@dataclass
class Corpus:
    name: str
    splits: dict[str, list[Document]] = field(default_factory=dict)
    by_folder: bool = False  # splits come from train/ search/ eval/ sub-folders, not from the fractions

    def split(self, name: str) -> list[Document]:
        docs = self.splits.get(name, [])
        if not docs and self.by_folder:
            raise DataError(f"corpus {self.name!r} has no documents in its {name!r} split (no {name}/ folder, or "
                            "an empty one); it is split by folder, so use another corpus for this stage")
        if not docs:
            raise DataError(
                f"corpus {self.name!r} has no documents in its {name!r} split; add documents or raise "
                f"data.{name}_fraction" if name != "train" else f"corpus {self.name!r} has no training documents")
        return docs


def bundled_corpus_path(name: str) -> Path:
    """Folder of a bundled corpus: 'testbed' (novels, train/search/eval) or 'jargon' (Jargon File, eval only)."""
    if name not in BUNDLED_CORPORA:
        raise DataError(f"no bundled corpus {name!r}; bundled: {', '.join(BUNDLED_CORPORA)}")
    return ASSETS / BUNDLED_CORPORA[name]


def testbed_corpus_path() -> Path:
    return bundled_corpus_path("testbed")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in TEXT_SUFFIXES + RECORD_SUFFIXES + TOKEN_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")  # noqa: SIM115 - caller closes


def _read_file(path: Path, text_field: str, id_prefix: str) -> Iterator[Document]:
    suffix = _suffix(path)
    try:
        if suffix in TEXT_SUFFIXES:
            with _open_text(path) as handle:
                yield Document(id=id_prefix, text=handle.read())
        elif suffix in (".jsonl", ".jsonl.gz"):
            with _open_text(path) as handle:
                for line_no, line in enumerate(handle):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if text_field not in record:
                        raise DataError(f"{path}:{line_no + 1}: no field {text_field!r}; set data.text_field")
                    yield Document(id=f"{id_prefix}:{line_no}", text=str(record[text_field]))
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError("reading .parquet needs pyarrow: pip install 'longrope-cli[parquet]'") from None
            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(table.column_names)}); "
                                "set data.text_field")
            for i, text in enumerate(table.column(text_field).to_pylist()):
                yield Document(id=f"{id_prefix}:{i}", text=str(text))
        # Token arrays stay memory-mapped in their file dtype: the ranks of a node share one copy through the
        # page cache, and windows become int64 only when they are cut.
        elif suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            rows = [array] if array.ndim == 1 else list(array)
            for i, row in enumerate(rows):
                yield Document(id=f"{id_prefix}:{i}", tokens=row)
        elif suffix == ".bin":
            yield Document(id=id_prefix, tokens=np.memmap(path, dtype=np.uint16, mode="r"))
        else:
            raise DataError(f"{path}: unsupported corpus file type; use .txt, .jsonl, .parquet, .npy or .bin")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"cannot read corpus file {path}: {str(err).splitlines()[0] if str(err) else err!r}") from None


def _corpus_files(folder: Path) -> list[Path]:
    suffixes = TEXT_SUFFIXES + RECORD_SUFFIXES + TOKEN_SUFFIXES
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))


def _split_by_folder(path: Path) -> bool:
    """True for a folder laid out as split sub-folders: all of train/, search/ and eval/, or some of them with
    no documents beside them other than a README (an eval-only corpus such as the bundled 'jargon')."""
    if not path.is_dir():
        return False
    present = [s for s in SPLITS if (path / s).is_dir()]
    if len(present) == len(SPLITS):
        return True
    if not present:
        return False
    return all(f.relative_to(path).parts[0] in SPLITS or f.name.upper().startswith("README")
               for f in _corpus_files(path))


def _content_key(doc: Document) -> bytes:
    """What a document's split is drawn from: its content, so that a text found twice in a corpus lands in one
    split (a search never scores what eval reports on)."""
    if doc.tokens is not None:
        return np.ascontiguousarray(doc.tokens).tobytes()
    return (doc.text or "").encode()


def _hash_split(key: bytes, search_fraction: float, eval_fraction: float) -> str:
    u = int(hashlib.sha1(key).hexdigest()[:12], 16) / 16**12
    if u < eval_fraction:
        return "eval"
    if u < eval_fraction + search_fraction:
        return "search"
    return "train"


def _load_saved_dataset(path: Path, text_field: str) -> list[Document]:
    try:
        import datasets
    except ImportError:
        raise DataError("reading a save_to_disk dataset needs `datasets`: pip install 'longrope-cli[datasets]'") from None
    loaded = datasets.load_from_disk(str(path))
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    docs = []
    for split_name, dataset in parts:
        if text_field not in dataset.column_names:
            if "input_ids" in dataset.column_names:
                docs.extend(Document(id=f"{split_name}:{i}", tokens=np.asarray(r, dtype=np.int64))
                            for i, r in enumerate(dataset["input_ids"]))
                continue
            raise DataError(f"dataset {path}: no column {text_field!r}; set data.text_field")
        docs.extend(Document(id=f"{split_name}:{i}", text=t) for i, t in enumerate(dataset[text_field]))
    return docs


def load_corpus(source: str = "testbed", text_field: str = "text", search_fraction: float = 0.1,
                eval_fraction: float = 0.1) -> Corpus:
    """Read a corpus and assign every document to exactly one split."""
    path = bundled_corpus_path(source) if source in BUNDLED_CORPORA else Path(source).expanduser()
    if not path.exists():
        names = " or ".join(repr(name) for name in BUNDLED_CORPORA)
        raise DataError(f"corpus {source!r} not found; give a file or folder (.txt, .jsonl, .parquet, .npy) or a "
                        f"bundled corpus: {names}")
    corpus = Corpus(name=source, splits={s: [] for s in SPLITS}, by_folder=_split_by_folder(path))
    if corpus.by_folder:
        for split in SPLITS:
            for file in _corpus_files(path / split):
                rel = file.relative_to(path).as_posix()
                corpus.splits[split].extend(_read_file(file, text_field, rel))
    else:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file()):
            docs = _load_saved_dataset(path, text_field)
        elif path.is_dir():
            docs = [d for f in _corpus_files(path) for d in _read_file(f, text_field, f.relative_to(path).as_posix())]
        else:
            docs = list(_read_file(path, text_field, path.name))
        for doc in docs:
            corpus.splits[_hash_split(_content_key(doc), search_fraction, eval_fraction)].append(doc)
    if not any(corpus.splits.values()):
        raise DataError(f"corpus {source!r} contains no documents; check the path and file types")
    return corpus


# --------------------------------------------------------------------------- tokenisation


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "longrope" / "tokens"


def tokenize_documents(docs: list[Document], tokenizer: Any, cache_dir: str | Path | None = None) -> list[np.ndarray]:
    """Token ids of each document (no special tokens), cached on disk by tokenizer and content."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    fingerprint = tokenizer_fingerprint(tokenizer)
    out = []
    for doc in docs:
        if doc.tokens is not None:
            out.append(doc.tokens)
            continue
        assert doc.text is not None
        key = hashlib.sha1(f"{fingerprint}\0{doc.text}".encode()).hexdigest()
        file = cache / fingerprint / f"{key}.npy"
        if file.is_file():
            try:
                out.append(np.load(file, mmap_mode="r"))
                continue
            except (OSError, ValueError):
                pass  # a torn cache entry is simply rebuilt
        ids = np.asarray(tokenizer(doc.text, add_special_tokens=False)["input_ids"], dtype=np.int32)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(f".{np.random.randint(1 << 30)}.tmp.npy")
            np.save(tmp, ids)
            tmp.replace(file)
        except OSError:
            pass  # caching is an optimisation; a read-only home must not stop a run
        out.append(ids)
    return out


def make_windows(token_docs: list[np.ndarray], length: int, count: int, bos_id: int | None,
                 windows_per_doc: int = 0, split: str = "search") -> torch.Tensor:
    """`count` windows of `length` tokens (BOS first), non-overlapping, taken round-robin across documents:
    first window of every long-enough document, then the second, ... (windows_per_doc caps it; 1 = paper)."""
    body = length - (1 if bos_id is not None else 0)
    usable = [doc for doc in token_docs if len(doc) >= body]
    if not usable:
        longest = max((len(d) for d in token_docs), default=0)
        raise DataError(
            f"no {split}-split document has {format_length(length)} tokens (longest: {longest}); use a corpus "
            "with longer documents or a shorter length")
    windows: list[np.ndarray] = []
    round_index = 0
    while len(windows) < count:
        if windows_per_doc and round_index >= windows_per_doc:
            break
        added = False
        for doc in usable:
            start = round_index * body
            if start + body > len(doc):
                continue
            window = doc[start:start + body]
            if bos_id is not None:
                window = np.concatenate([[bos_id], window])
            windows.append(window)
            added = True
            if len(windows) == count:
                break
        if not added:
            break
        round_index += 1
    if len(windows) < count:
        raise DataError(
            f"the {split} split yields only {len(windows)} windows of {format_length(length)} tokens, {count} needed; "
            "lower the document count, raise data.windows_per_doc, or use a larger corpus")
    return torch.tensor(np.stack(windows).astype(np.int64))


def split_windows(spans: torch.Tensor, length: int, bos_id: int | None) -> torch.Tensor:
    """Cut each BOS-first span into consecutive BOS-first windows of `length` tokens, so that every length
    scores (nearly) the same text and a change in perplexity comes from the context length alone."""
    skip = 1 if bos_id is not None else 0
    body = length - skip
    text = spans[:, skip:]
    pieces = text.shape[1] // body
    if pieces < 1:
        raise DataError(f"a {format_length(length)} window does not fit in spans of {spans.shape[1]} tokens")
    windows = text[:, :pieces * body].reshape(-1, body)
    if bos_id is not None:
        windows = torch.cat([torch.full((windows.shape[0], 1), bos_id, dtype=windows.dtype), windows], dim=1)
    return windows


def load_windows(data_cfg: Any, tokenizer: Any, split: str, length: int, count: int) -> torch.Tensor:
    """Windows for a stage, straight from a `DataConfig` (recipe `data:` section)."""
    corpus = load_corpus(data_cfg.corpus, data_cfg.text_field, data_cfg.search_fraction, data_cfg.eval_fraction)
    tokens = tokenize_documents(corpus.split(split), tokenizer, data_cfg.cache_dir)
    return make_windows(tokens, length, count, tokenizer.bos_token_id, data_cfg.windows_per_doc, split)

#!/usr/bin/env python3
"""Rebuild the offline book corpus from Debian packages.

Downloads ``r-cran-janeaustenr`` (Jane Austen's six novels) and
``r-cran-tokenizers`` (Moby Dick) with ``apt-get download``, unpacks them with
``dpkg -x`` and reads the R lazy-load data (``Rdata.rdx``/``Rdata.rdb``) with
the PyPI package ``rdata``; R itself is not needed.  Each book is cleaned
(wrapped lines joined, italics underscores and Project Gutenberg boilerplate
removed, chapter headings kept) and written as one gzip text file whose
paragraphs are separated by blank lines::

    src/longrope_cli/assets/corpus/<split>/<slug>.txt.gz

Output is byte-deterministic (gzip mtime 0, no file name in the header).

Usage::

    python scripts/build_corpus.py                  # download with apt-get
    python scripts/build_corpus.py --deb-dir DEBS   # use already downloaded .deb files
"""

from __future__ import annotations

import argparse
import gzip
import io
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

PACKAGES = ("r-cran-janeaustenr", "r-cran-tokenizers")

# R object name -> (split, slug)
BOOKS: dict[str, tuple[str, str]] = {
    "emma": ("train", "emma"),
    "mansfieldpark": ("train", "mansfield-park"),
    "prideprejudice": ("train", "pride-and-prejudice"),
    "sensesensibility": ("train", "sense-and-sensibility"),
    "mobydick": ("train", "moby-dick"),
    "northangerabbey": ("search", "northanger-abbey"),
    "persuasion": ("eval", "persuasion"),
}

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "longrope_cli" / "assets" / "corpus"

README = """\
# Offline book corpus

Seven public-domain novels, one gzip-compressed UTF-8 text file per book,
paragraphs separated by blank lines. Rebuild byte-for-byte with
`python scripts/build_corpus.py` (needs `apt-get`; no R, no internet beyond
the Debian archive).

## Source

| Debian package | Upstream | Books |
| --- | --- | --- |
| `r-cran-janeaustenr` | R package janeaustenr (MIT licence) | Jane Austen's six completed novels |
| `r-cran-tokenizers` | R package tokenizers (MIT licence) | Herman Melville, *Moby Dick* (Project Gutenberg EBook #2701) |

The novels themselves are in the public domain (first published 1811-1851).
The R packages that carry them are MIT-licensed; only the book texts are used
here. The build reads each package's R lazy-load data (`Rdata.rdx`/`Rdata.rdb`)
with the PyPI package `rdata`.

Cleaning: wrapped lines are joined into one line per paragraph, runs of
spaces collapsed, `_italics_` underscores removed, chapter and volume headings
kept as their own paragraphs. The Project Gutenberg header, transcriber's note
and licence are cut from *Moby Dick*, and the modern editorial "A Note on the
Text" is cut from the end of *Northanger Abbey*.

## Splits

| Split | Books | Used for |
| --- | --- | --- |
| `train/` | emma, mansfield-park, pride-and-prejudice, sense-and-sensibility, moby-dick | tokenizer and model training |
| `search/` | northanger-abbey | fitness of the rescale-factor search |
| `eval/` | persuasion | reported perplexity and held-out numbers |

Splits hold out *whole books* rather than random windows of the same books,
so no passage, character name pattern or chapter seen in training or search
leaks into evaluation: the search never scores evaluation documents, and the
model never trained on either held-out book.

## Sizes

{sizes}
"""


def fail(message: str) -> None:
    """Print a one-line error and exit."""
    print(f"build_corpus: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def download_debs(dest: Path) -> list[Path]:
    """Download the Debian packages into ``dest`` with ``apt-get download``."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        fail("apt-get/dpkg not found: run on Debian/Ubuntu, or pass --deb-dir with the .deb files")
    proc = subprocess.run(["apt-get", "download", *PACKAGES], cwd=dest, capture_output=True, text=True)
    debs = sorted(dest.glob("*.deb"))
    if proc.returncode != 0 or len(debs) < len(PACKAGES):
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        fail(f"apt-get download {' '.join(PACKAGES)} failed ({last}); try `apt-get update` first")
    return debs


def read_lazyload(prefix: Path) -> dict[str, object]:
    """Read every object of an R lazy-load database (``prefix.rdx`` + ``prefix.rdb``)."""
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns about the .rdx extension
        index = rdata.conversion.convert(rdata.parser.parse_file(prefix.with_suffix(".rdx")))
        blob = prefix.with_suffix(".rdb").read_bytes()
        objects: dict[str, object] = {}
        for name, (offset, length) in index["variables"].items():
            entry = blob[int(offset) : int(offset) + int(length)]
            (size,) = struct.unpack(">I", entry[:4])
            raw = zlib.decompress(entry[4:])
            if len(raw) != size:
                fail(f"corrupt entry {name!r} in {prefix.name}.rdb")
            objects[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw))
    return objects


def extract_books(debs: list[Path], workdir: Path) -> dict[str, list[str]]:
    """Unpack the .deb files and return each book as a list of raw lines."""
    root = workdir / "root"
    for deb in debs:
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    books: dict[str, list[str]] = {}
    for prefix in sorted(root.glob("usr/lib/R/site-library/*/data/Rdata.rdx")):
        for name, obj in read_lazyload(prefix.with_suffix("")).items():
            if name in BOOKS:
                lines = [str(x) for x in obj]  # character vector
                text = "\n".join(lines).replace("\r\n", "\n").replace("\r", "\n")
                books[name] = text.lstrip("\ufeff").split("\n")
    missing = sorted(set(BOOKS) - set(books))
    if missing:
        fail(f"books not found in the packages: {', '.join(missing)}")
    return books


def trim_moby_dick(lines: list[str]) -> list[str]:
    """Cut the Project Gutenberg header, transcriber's note and licence."""
    start = next(i for i, line in enumerate(lines) if line.startswith("MOBY DICK; OR THE WHALE"))
    body = next(i for i, line in enumerate(lines) if line.strip() == "ETYMOLOGY.")
    end = next(i for i, line in enumerate(lines) if line.startswith("End of Project Gutenberg"))
    return lines[start : start + 3] + [""] + lines[body:end]


def trim_northanger_abbey(lines: list[str]) -> list[str]:
    """Cut the modern editorial note at the end."""
    end = next((i for i, line in enumerate(lines) if line.strip() == "A NOTE ON THE TEXT"), len(lines))
    return lines[:end]


def clean(lines: list[str]) -> str:
    """Join wrapped lines into paragraphs separated by one blank line."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in lines + [""]:
        line = line.strip()
        if line:
            current.append(line)
            continue
        if current:
            para = " ".join(current)
            para = re.sub(r"_([^_]*)_", r"\1", para).replace("_", "")
            para = re.sub(r"\s+", " ", para).strip()
            if para:
                paragraphs.append(para)
            current = []
    return "\n\n".join(paragraphs) + "\n"


def write_gzip(path: Path, text: str) -> None:
    """Write ``text`` gzip-compressed with a fixed header (mtime 0, no name)."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="corpus directory (default: package assets)"
    )
    parser.add_argument(
        "--deb-dir", type=Path, help="directory holding the .deb files (skip apt-get download)"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="longrope-corpus-") as tmp:
        workdir = Path(tmp)
        if args.deb_dir is not None:
            debs = sorted(p for p in args.deb_dir.glob("*.deb") if p.name.startswith(PACKAGES))
            if len(debs) < len(PACKAGES):
                fail(f"--deb-dir {args.deb_dir} must hold the .deb files of {', '.join(PACKAGES)}")
        else:
            debs = download_debs(workdir)
        if shutil.which("dpkg") is None:
            fail("dpkg not found: it is needed to unpack the .deb files")
        books = extract_books(debs, workdir)

    rows = ["| Split | File | Characters | Paragraphs |", "| --- | --- | ---: | ---: |"]
    for name, (split, slug) in BOOKS.items():
        lines = books[name]
        if name == "mobydick":
            lines = trim_moby_dick(lines)
        elif name == "northangerabbey":
            lines = trim_northanger_abbey(lines)
        text = clean(lines)
        path = args.out / split / f"{slug}.txt.gz"
        write_gzip(path, text)
        n_par = text.count("\n\n") + 1
        rows.append(f"| {split} | `{split}/{slug}.txt.gz` | {len(text):,} | {n_par:,} |")
        print(f"{split:6s} {slug:22s} {len(text):>9,} chars {n_par:>6,} paragraphs")
    (args.out / "README.md").write_text(README.format(sizes="\n".join(rows) + "\n"), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Rebuild the offline book corpus and the Jargon File eval corpus from Debian packages.

Downloads ``r-cran-janeaustenr`` (Jane Austen's six novels) and
``r-cran-tokenizers`` (Moby Dick) with ``apt-get download``, unpacks them with
``dpkg -x`` and reads the R lazy-load data (``Rdata.rdx``/``Rdata.rdb``) with
the PyPI package ``rdata``; R itself is not needed.  Each book is cleaned
(wrapped lines joined, italics underscores and Project Gutenberg boilerplate
removed, chapter headings kept) and written as one gzip text file whose
paragraphs are separated by blank lines::

    src/longrope_cli/assets/corpus/<split>/<slug>.txt.gz

A second, held-out corpus of another domain comes from ``jargon-text`` (the
Jargon File 4.4.7, public domain): its plain-text rendering is cleaned (tables
of contents and the glossary's headword indexes dropped, wrapped lines joined,
``{cross-reference}`` braces removed, box-drawn tables flattened to one line per
row; verse, code and ASCII art keep their line breaks) and written as the single
document::

    src/longrope_cli/assets/corpus-jargon/eval/jargon-file.txt.gz

Output is byte-deterministic (gzip mtime 0, no file name in the header).

Usage::

    python scripts/build_corpus.py                  # download with apt-get, build everything
    python scripts/build_corpus.py --deb-dir DEBS   # use already downloaded .deb files
    python scripts/build_corpus.py --only jargon    # only the Jargon File corpus (no rdata needed)
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
JARGON_PACKAGE = "jargon-text"
JARGON_MEMBER = "usr/share/doc/jargon-text/jargon.txt.gz"
JARGON_SLUG = "jargon-file"

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

ASSETS = Path(__file__).resolve().parent.parent / "src" / "longrope_cli" / "assets"
DEFAULT_OUT = ASSETS / "corpus"
DEFAULT_JARGON_OUT = ASSETS / "corpus-jargon"
TESTBED_TOKENIZER = ASSETS / "testbed" / "tokenizer.json"

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

A second held-out corpus of another domain (the Jargon File, hacker slang and
folklore; eval split only) lives in `../corpus-jargon/` (corpus name `jargon`).

## Sizes

{sizes}
"""


JARGON_README = """\
# Jargon File eval corpus

One held-out document of another domain than the bundled novels: the Jargon
File {version}, Eric S. Raymond's lexicon of hacker slang, folklore and
humour (the introduction chapters, {entries:,} lexicon entries from `(TM)` to
`zorkmid`, and the appendices, among them *The Story of Mel*). A quality
benchmark can score perplexity on it to see how a search tuned on Austen and
Melville transfers to text whose domain the search never saw. It has only an
`eval/` split; load it by name with `load_corpus("jargon")` or the recipe
setting `data.corpus: jargon`. Rebuild byte-for-byte with
`python scripts/build_corpus.py` (or `--only jargon`; needs `apt-get`, no
internet beyond the Debian archive).

## Source and licence

Debian package `{package}` (version {deb_version}), file
`/{member}`, upstream <http://www.catb.org/~esr/jargon/>.
The Jargon File is in the public domain ("to be freely used, shared, and
modified"; cite it as "Jargon File {version_number}"). The Debian packaging scripts
are GPL, but only the text is used here.

Cleaning: the tables of contents, the glossary's headword indexes and the
"framed version" link are dropped; wrapped lines are joined into one line per
paragraph and runs of spaces collapsed; the `:headword:` markers become
`headword:` (an empty pronunciation `//` is dropped) and the braces of
`{{cross-references}}` are removed. Box-drawn tables are flattened to one line
per row with cells separated by ` | `. Text set as literal layout (no-break
spaces between words: verse such as *The Story of Mel*, songs, dialogues),
code samples, quoted mail and ASCII art keep their line breaks (dedented).
Chapter, appendix and letter headings are kept as their own paragraphs.

## Size

| Split | File | Bytes (gz) | Characters | Paragraphs | Tokens (test-bed tokenizer) |
| --- | --- | ---: | ---: | ---: | ---: |
| eval | `eval/{slug}.txt.gz` | {gz_bytes:,} | {chars:,} | {paragraphs:,} | {tokens:,} |

Uncompressed: {raw_bytes:,} bytes of UTF-8. Tokens are counted with the
bundled test-bed tokenizer (`assets/testbed/tokenizer.json`, no special
tokens): enough for {windows_2k:,} non-overlapping 2k windows or {windows_32k:,} of 32k.
"""

BOX_CHARS = re.compile(r"[\u2500-\u257f]")
JARGON_HEADWORD = re.compile(r":([^:]+):(?: (.*))?")
LITERAL_SPACE = re.compile(r"\w\u00a0")
LIST_MARKER = re.compile(r"(?:•|\(?\d+[.)]|\(?[a-z][.)]) +")


def fail(message: str) -> None:
    """Print a one-line error and exit."""
    print(f"build_corpus: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def download_debs(dest: Path, packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    """Download the Debian packages into ``dest`` with ``apt-get download``."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        fail("apt-get/dpkg not found: run on Debian/Ubuntu, or pass --deb-dir with the .deb files")
    proc = subprocess.run(["apt-get", "download", *packages], cwd=dest, capture_output=True, text=True)
    debs = sorted(p for p in dest.glob("*.deb") if p.name.startswith(tuple(f"{n}_" for n in packages)))
    if proc.returncode != 0 or len(debs) < len(packages):
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        fail(f"apt-get download {' '.join(packages)} failed ({last}); try `apt-get update` first")
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


def extract_jargon(deb: Path, workdir: Path) -> list[str]:
    """Unpack ``jargon-text`` and return the Jargon File as a list of raw lines."""
    root = workdir / "jargon-root"
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    member = root / JARGON_MEMBER
    if not member.is_file():
        fail(f"{deb.name} has no /{JARGON_MEMBER}")
    text = gzip.decompress(member.read_bytes()).decode("utf-8")
    return text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff").split("\n")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_prose(block: list[str]) -> bool:
    """Wrapped running text: one indent (a hanging indent after a list marker allowed), no column layout."""
    if any(BOX_CHARS.search(line) or "  " in line.strip() for line in block):
        return False
    first = _indent(block[0])
    marker = LIST_MARKER.match(block[0], first)
    allowed = {first, first + len(marker.group(0))} if marker else {first}
    return all(_indent(line) in allowed for line in block[1:])


def _unbrace(text: str) -> str:
    """``{cross reference}`` -> ``cross reference`` (the vh hypertext links; ``{{x}}`` too). Braces right
    after a letter or digit are not links but text (the shell glob ``foo{baz,qux}``)."""
    return re.sub(r"(?<!\w)\{+([^{}\n]+)\}+", r"\1", text)


def _flatten_table(block: list[str]) -> str:
    """A box-drawn table -> one line per row, cells joined by ' | ' (wrapped cell text joined)."""
    rows: list[str] = []
    cells: list[list[str]] = []
    for line in block + ["└"]:
        line = line.strip()
        if line[:1] in "┌├└":  # rule line: the row above is complete
            if cells:
                rows.append(" | ".join(_unbrace(" ".join(" ".join(c).split())) for c in cells).strip())
            cells = []
            continue
        parts = line.strip("│").split("│")
        if not cells:
            cells = [[] for _ in parts]
        if len(parts) != len(cells):
            fail(f"ragged table row in the Jargon File: {line!r}")
        for cell, part in zip(cells, parts, strict=True):
            cell.append(part)
    return "\n".join(rows)


def clean_jargon(lines: list[str]) -> tuple[str, int]:
    """The Jargon File as paragraphs separated by blank lines, and its number of lexicon entries."""
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in lines + [""]:
        if line.strip():
            current.append(line.rstrip())
        elif current:
            blocks.append(current)
            current = []

    out: list[str] = []
    entries = 0
    skip_toc = False  # inside a "Table of Contents" list
    skip_index = False  # inside a glossary headword index (before the first entry of a letter)
    in_glossary = False
    for raw in blocks:
        # A no-break space between words marks DocBook literal layout (verse such as The Story of Mel, songs,
        # dialogues): its line breaks are kept. Elsewhere no-break spaces are typography (headings, list markers).
        literal = any(LITERAL_SPACE.search(line) for line in raw)
        block = [line.replace("\u00a0", " ").rstrip() for line in raw]
        first = block[0]
        stripped = first.strip()
        single = len(block) == 1
        if skip_toc:
            if single and _indent(first) == 3:
                continue
            skip_toc = False
        if single and stripped == "Table of Contents":
            skip_toc = True
            continue
        if single and stripped == "Here is a framed version of the glossary.":
            continue
        if single and _indent(first) == 0:  # chapter / appendix heading
            in_glossary = stripped == "Glossary"
            skip_index = in_glossary
            out.append(stripped)
            continue
        if in_glossary:
            if single and _indent(first) == 2 and len(stripped) == 1:  # letter heading ("  A")
                skip_index = True
                out.append(stripped)
                continue
            if _indent(first) == 3 and JARGON_HEADWORD.fullmatch(" ".join(line.strip() for line in block)):
                skip_index = False
            if skip_index:
                if not single:
                    fail(f"unexpected paragraph in a glossary index: {stripped!r}")
                continue
            match = JARGON_HEADWORD.fullmatch(" ".join(line.strip() for line in block))
            if match and _indent(first) == 3:
                entries += 1
                rest = re.sub(r"^//(?:,\s*|\s*$)", "", (match.group(2) or "").strip())
                out.append(f"{match.group(1)}: {rest}".rstrip())
                continue
        if not BOX_CHARS.sub("", "".join(block)).strip():  # a rule line
            continue
        if stripped.startswith("┌"):
            out.append(_flatten_table(block))
        elif literal:
            dedent = min(_indent(line) for line in block)
            out.append(_unbrace("\n".join(line[dedent:] for line in block)))
        elif _is_prose(block):
            para = _unbrace(" ".join(line.strip() for line in block))
            out.append(re.sub(r"\s+", " ", para).strip())
        else:  # code, quoted mail, ASCII art: keep the layout; only word-like "(see {micro-})" links lose braces
            dedent = min(_indent(line) for line in block)
            layout = "\n".join(line[dedent:] for line in block)
            out.append(re.sub(r"(?<=[\s(])\{(\w[\w\-' .]*)\}", r"\1", layout))
    if entries < 2000 or not any(p.startswith("The Story of Mel") for p in out):
        fail(f"the Jargon File text looks different than expected ({entries} entries found)")
    return "\n\n".join(out) + "\n", entries


def count_tokens(text: str) -> int:
    """Tokens of ``text`` with the bundled test-bed tokenizer (no special tokens)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        fail("counting tokens needs the `tokenizers` package (pip install tokenizers)")
    if not TESTBED_TOKENIZER.is_file():
        fail(f"test-bed tokenizer not found at {TESTBED_TOKENIZER}")
    tokenizer = Tokenizer.from_file(str(TESTBED_TOKENIZER))
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def build_jargon(deb: Path, workdir: Path, out: Path) -> None:
    """Write ``out/eval/jargon-file.txt.gz`` and ``out/README.md``."""
    text, entries = clean_jargon(extract_jargon(deb, workdir))
    path = out / "eval" / f"{JARGON_SLUG}.txt.gz"
    write_gzip(path, text)
    deb_version = deb.name.split("_")[1] if deb.name.count("_") >= 2 else "unknown"
    version_number = deb_version.split("-")[0]
    tokens = count_tokens(text)
    n_par = text.count("\n\n") + 1
    readme = JARGON_README.format(
        version=f"version {version_number}",
        version_number=version_number,
        package=JARGON_PACKAGE,
        deb_version=deb_version,
        member=JARGON_MEMBER,
        slug=JARGON_SLUG,
        gz_bytes=path.stat().st_size,
        chars=len(text),
        paragraphs=n_par,
        tokens=tokens,
        raw_bytes=len(text.encode("utf-8")),
        entries=entries,
        windows_2k=tokens // 2047,
        windows_32k=tokens // 32767,
    )
    (out / "README.md").write_text(readme, encoding="utf-8")
    print(f"{'eval':6s} {JARGON_SLUG:22s} {len(text):>9,} chars {n_par:>6,} paragraphs {tokens:>8,} tokens")
    print(f"wrote {out}")


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
        "--jargon-out",
        type=Path,
        default=DEFAULT_JARGON_OUT,
        help="Jargon File corpus directory (default: package assets)",
    )
    parser.add_argument(
        "--deb-dir", type=Path, help="directory holding the .deb files (skip apt-get download)"
    )
    parser.add_argument(
        "--only",
        choices=("books", "jargon"),
        help="build only the book corpus or only the Jargon File corpus",
    )
    args = parser.parse_args(argv)
    want_books = args.only in (None, "books")
    want_jargon = args.only in (None, "jargon")
    packages = (PACKAGES if want_books else ()) + ((JARGON_PACKAGE,) if want_jargon else ())

    with tempfile.TemporaryDirectory(prefix="longrope-corpus-") as tmp:
        workdir = Path(tmp)
        if args.deb_dir is not None:
            prefixes = tuple(f"{name}_" for name in packages)
            debs = sorted(p for p in args.deb_dir.glob("*.deb") if p.name.startswith(prefixes))
            if len(debs) < len(packages):
                fail(f"--deb-dir {args.deb_dir} must hold the .deb files of {', '.join(packages)}")
        else:
            debs = download_debs(workdir, packages)
        if shutil.which("dpkg") is None:
            fail("dpkg not found: it is needed to unpack the .deb files")
        book_debs = [p for p in debs if not p.name.startswith(f"{JARGON_PACKAGE}_")]
        books = extract_books(book_debs, workdir) if want_books else {}
        if want_jargon:
            (jargon_deb,) = [p for p in debs if p.name.startswith(f"{JARGON_PACKAGE}_")]
            build_jargon(jargon_deb, workdir, args.jargon_out)
    if not want_books:
        return 0

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

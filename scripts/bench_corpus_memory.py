#!/usr/bin/env python3
"""Resident memory of opening a pre-tokenised corpus: memory-mapped (longrope) vs read into int64.

A fine-tuning rank opens the train split and cuts windows from it. Each variant runs in a fresh subprocess
on the same uint16 `.bin` file (nanoGPT style) and reports the growth of RSS after opening the corpus and
cutting `--windows` windows of `--length` tokens, i.e. what each rank pays for the data:

- mmap: `data.load_corpus` + `make_windows` as shipped: the array stays a read-only memory map in its file
  dtype, so only the pages the windows touch become resident (and are shared by every rank of a node).
- int64: the same file read with `np.fromfile(...).astype(np.int64)`, as before: 8 bytes per token per rank.

Usage::

    python scripts/bench_corpus_memory.py                       # 100M tokens (200 MB file)
    python scripts/bench_corpus_memory.py --tokens 20000000 --json runs/bench-corpus.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MIB = 1024 * 1024


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("needs Linux /proc")


def measure(variant: str, folder: str, length: int, windows: int) -> dict:
    from longrope_cli.data import load_corpus, make_windows

    before = rss()
    if variant == "mmap":
        docs = [d.tokens for d in load_corpus(folder).split("train")]
    else:
        docs = [np.fromfile(next(Path(folder, "train").glob("*.bin")), dtype=np.uint16).astype(np.int64)]
    batch = make_windows(docs, length, windows, bos_id=1, split="train")
    return {"variant": variant, "rss_mib": round((rss() - before) / MIB, 1), "windows": list(batch.shape)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=100_000_000, help="corpus size in tokens")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.length, args.windows)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for split in ("train", "eval"):
            Path(tmp, split).mkdir()
        rng = np.random.default_rng(0)
        rng.integers(3, 32000, size=args.tokens, dtype=np.uint16).tofile(Path(tmp, "train", "tokens.bin"))
        rng.integers(3, 32000, size=10_000, dtype=np.uint16).tofile(Path(tmp, "eval", "tokens.bin"))
        results = []
        for variant in ("mmap", "int64"):
            out = subprocess.run([sys.executable, __file__, "--length", str(args.length), "--windows",
                                  str(args.windows), "--child", variant, tmp],
                                 check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"corpus: {args.tokens:,} uint16 tokens ({args.tokens * 2 / MIB:,.0f} MiB file); "
          f"{args.windows} windows of {args.length}")
    for r in results:
        print(f"  {r['variant']:6s} RSS +{r['rss_mib']:>8.1f} MiB")
    mmap, full = (r["rss_mib"] for r in results)
    print(f"  int64 / mmap: {full / max(mmap, 0.1):,.0f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"tokens": args.tokens, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

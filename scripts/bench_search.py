#!/usr/bin/env python3
"""Benchmarks of `longrope search` (numbers for the README; no test depends on timings).

1. scoring: time and peak memory of our fitness evaluator (decoder forward + chunked loss) against
   `model(ids, labels=ids)` (full L x vocab logits) at 2k, 8k, 16k tokens;
2. throughput: model FLOP/s of the evaluator as a fraction of a large matmul measured in the same run;
3. overhead: search wall time / (evaluations x mean evaluation time);
4. quality on the test bed at 8x: eval-split perplexity of none / PI / NTK / YaRN / searched factors, and the
   evaluations (and window forwards) needed with and without the cache and racing.

Usage (CPU, a few minutes on 2 cores with the bundled test bed):

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_search.py
    python scripts/bench_search.py --parts 1,2 --lengths 2k,8k         # shrink
    python scripts/bench_search.py --parts 4 --population 32 --iterations 10 --documents 5
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from longrope_cli.data import load_windows  # noqa: E402
from longrope_cli.evaluate.perplexity import score_perplexity  # noqa: E402
from longrope_cli.lengths import format_length, parse_length, parse_lengths  # noqa: E402
from longrope_cli.models import load_model  # noqa: E402
from longrope_cli.recipe import load_recipe  # noqa: E402
from longrope_cli.rope.baselines import baseline_factors  # noqa: E402
from longrope_cli.rope.factors import load_factors  # noqa: E402
from longrope_cli.rope.rotary import install_factors, remove_factors  # noqa: E402
from longrope_cli.search.evaluator import LocalEvaluator  # noqa: E402
from longrope_cli.stages.search import run_search  # noqa: E402

# --------------------------------------------------------------------------- measuring


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure(fn, device: torch.device) -> tuple[float, float, object]:
    """(seconds, peak extra memory in MiB, result) of fn(); CUDA: allocator peak, CPU: peak RSS above the start."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
        start_mem = _rss_kib("VmRSS") * 1024
    started = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    return seconds, (peak - start_mem) / 2**20, result


def forward_flops(config, length: int) -> float:
    """Forward FLOPs of a Llama-style decoder on one sequence: 2 x weights x tokens plus causal attention."""
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * config.intermediate_size  # q, o, k, v, gate/up/down
    dense = 2 * length * (layers * per_layer + d * vocab)
    attention = layers * 2 * length * length * d  # QK^T and AV, 2*L^2*d each, halved by the causal mask
    return dense + attention


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5, trials: int = 3) -> float:
    """FLOP/s of an n x n matmul: the best of a few trials (a shared machine only ever slows it down)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = min(measure(lambda: [a @ b for _ in range(reps)], device)[0] for _ in range(trials))
    return 2 * n**3 * reps / best


def table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in [h, *[r[i] for r in rows]]) for i, h in enumerate(header)]
    print(f"\n## {title}\n")
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) + " |")


# --------------------------------------------------------------------------- parts


def measure_one(args) -> None:
    """Child process: load the model, time and measure one scoring of one window, print JSON. A fresh process per
    measurement, so that one method's freed-but-resident memory does not hide the other's peak."""
    method, length = args.measure[0], parse_length(args.measure[1])
    lm = load_model(args.model, device=args.device)
    device = lm.device
    windows = load_windows(args.data, lm.tokenizer, "search", length, 1)
    warm = windows[:, :min(length, 256)]
    factors = baseline_factors("pi", lm.layout, max(length, lm.layout.original_length + 1))
    install_factors(lm.model, factors, lm.layout)
    if method == "ours":
        evaluator = LocalEvaluator(lm.model, lm.layout, windows, chunk=args.chunk)
        LocalEvaluator(lm.model, lm.layout, warm, chunk=args.chunk).score(factors)  # warm-up on a short window
        seconds, peak, fit = measure(lambda: evaluator.score(factors), device)
        ppl = float(fit)
    else:
        ids = windows.to(device)

        def reference(ids=ids):
            with torch.no_grad():
                return float(lm.model(input_ids=ids, labels=ids, use_cache=False).loss)

        reference(warm.to(device))
        seconds, peak, loss = measure(reference, device)
        ppl = float(torch.tensor(loss).exp())
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "perplexity": ppl}))


def _child(args, method: str, length: int) -> dict:
    command = [sys.executable, __file__, "--model", args.model, "--corpus", args.corpus, "--device", args.device,
               "--chunk", str(args.chunk), "--measure", method, str(length)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_scoring(lm, args, device) -> list[dict]:
    rows, out = [], []
    dtype = next(lm.model.parameters()).dtype
    peak = matmul_flops(device, dtype)
    for length in args.lengths:
        ours, ref = _child(args, "ours", length), _child(args, "reference", length)
        flops = forward_flops(lm.model.config, length)
        logits_mb = length * lm.model.config.vocab_size * 4 / 2**20
        rate = flops / ours["seconds"]
        rows.append([format_length(length), f"{ours['seconds']:.2f}", f"{ref['seconds']:.2f}",
                     f"{ours['peak_mib']:.0f}", f"{ref['peak_mib']:.0f}", f"{logits_mb:.0f}",
                     f"{ours['perplexity']:.3f}", f"{ref['perplexity']:.3f}", f"{rate / 1e9:.1f}", f"{rate / peak:.2f}"])
        out.append({"length": length, "ours": ours, "reference": ref, "gflops": rate / 1e9,
                    "fraction_of_matmul": rate / peak})
    table(f"1-2. scoring one window, fresh process each ({device.type}, {dtype}; matmul {peak / 1e9:.1f} GFLOP/s)",
          ["length", "ours s", "model(labels) s", "ours peak MiB", "model(labels) peak MiB", "fp32 logits MiB",
           "ours ppl", "model(labels) ppl", "ours GFLOP/s", "fraction of matmul"], rows)
    return out


def search_recipe(args, target: int, *extra: str):
    return load_recipe(None, [
        f"model.name={args.model}", f"data.corpus={args.corpus}", f"search.target={target}",
        f"search.population={args.population}", f"search.survivors={max(1, args.population // 2)}",
        f"search.mutations={max(1, args.population // 4)}", f"search.crossovers={max(1, args.population // 4)}",
        f"search.iterations={args.iterations}", f"search.documents={args.documents}", "search.start_tokens=0",
        f"model.loss_chunk={args.chunk}", *extra])


def forwards_to_reach(out: Path, goal: float) -> int | None:
    """Window forwards spent (in log order) until a complete candidate scored <= goal."""
    spent = 0
    for line in (out / "candidates.jsonl").read_text().splitlines():
        record = json.loads(line)
        spent += record["windows"]
        if record["complete"] and record["perplexity"] != "inf" and record["perplexity"] <= goal * (1 + 1e-9):
            return spent
    return None


def bench_search(lm, args, device) -> dict:
    target = args.target
    windows = load_windows(args.data, lm.tokenizer, "search", target, args.documents)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("plain", []), ("racing", ["search.racing=true"])):
            out = Path(tmp) / name
            started = time.perf_counter()
            result = run_search(search_recipe(args, target, *extra), out, lm=lm, windows=windows, progress=False)
            wall = time.perf_counter() - started
            runs[name] = (result, wall, out)
        goal = max(result.best_perplexity for result, _, _ in runs.values())  # a level every run reaches
        rows, overhead = [], []
        for name, (result, wall, out) in runs.items():
            c = result.counters
            mean_eval = c["eval_seconds"] / max(result.evaluations, 1)
            overhead.append([name, result.evaluations, f"{mean_eval:.3f}", f"{wall:.1f}",
                             f"{wall / (result.evaluations * mean_eval):.3f}"])
            rows.append([name, result.evaluations + int(c["duplicates"]) + int(c["cache_hits"]), result.evaluations,
                         int(c["duplicates"]), int(c["cache_hits"]), int(c["raced"]), int(c["windows"]),
                         forwards_to_reach(out, goal), f"{result.best_perplexity:.4f}"])
        table("3. overhead: search wall time / (evaluations x mean evaluation time)",
              ["run", "evaluations", "mean eval s", "wall s", "overhead"], overhead)
        table(f"4a. evaluations at {format_length(target)} (population {args.population}, {args.iterations} "
              f"generations, {args.documents} documents)",
              ["run", "evaluations without dedup", "evaluations (cache)", "duplicate draws", "cache hits", "raced",
               "window forwards", f"forwards to reach {goal:.4f}", "best ppl"], rows)
        # 4b: held-out perplexity (eval split) next to the fitness (search split), every method scored the same way
        eval_windows = load_windows(args.data, lm.tokenizer, "eval", target, args.eval_documents)
        methods = {m: baseline_factors(m, lm.layout, target) for m in ("none", "pi", "ntk", "yarn")}
        for name, (_, _, out) in runs.items():
            methods[f"searched ({name})"] = load_factors(out / "factors.json", lm.layout)
        scores, rows = {}, []
        for name, factors in methods.items():
            install_factors(lm.model, factors, lm.layout)
            held_out = score_perplexity(lm.model, eval_windows, chunk=args.chunk).perplexity
            fitness = score_perplexity(lm.model, windows, chunk=args.chunk).perplexity
            scores[name] = held_out
            rows.append([name, f"{held_out:.3f}", f"{fitness:.3f}"])
        remove_factors(lm.model)
        table(f"4b. perplexity at {format_length(target)} ({lm.layout.scale(target):g}x the window): eval split "
              f"({args.eval_documents} windows) and search split ({args.documents}, the fitness)",
              ["method", "eval split", "search split"], rows)
    return {"eval_split": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--corpus", default="testbed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parts", default="1,2,3,4", help="which benchmarks (1 and 2 run together, 3 and 4 too)")
    parser.add_argument("--lengths", default="2k,8k,16k", help="scoring lengths (part 1-2)")
    parser.add_argument("--target", default="2k", help="search target (parts 3-4); testbed window is 256")
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--documents", type=int, default=3)
    parser.add_argument("--eval-documents", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=1024, help="loss chunk (tokens per logits block)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("--measure", nargs=2, default=None, help=argparse.SUPPRESS)  # internal: one child measurement
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.lengths = parse_lengths(args.lengths)
    args.target = parse_length(args.target)
    args.data = load_recipe(None, [f"data.corpus={args.corpus}"]).data
    if args.measure:
        measure_one(args)
        return
    parts = {p.strip() for p in args.parts.split(",")}
    lm = load_model(args.model, device=args.device)
    device = lm.device
    print(f"model {args.model}: {lm.layout.pairs} pairs, window {lm.layout.original_length}, "
          f"{sum(p.numel() for p in lm.model.parameters()) / 1e6:.1f}M parameters; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}")
    numbers = {}
    if parts & {"1", "2"}:
        numbers["scoring"] = bench_scoring(lm, args, device)
    if parts & {"3", "4"}:
        numbers["search"] = bench_search(lm, args, device)
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()

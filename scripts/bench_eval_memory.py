#!/usr/bin/env python3
"""Peak memory of scoring one window: longrope's chunked path vs `model(ids, labels=ids)`.

Each (path, length) runs in a fresh subprocess so that the allocator's high-water mark belongs to that
measurement alone. Reported: the growth of peak RSS (`ru_maxrss`) over the RSS measured just before the
forward pass (with every weight already read in), i.e. what scoring one window costs on top of the loaded model.

- layerwise: `longrope_cli.layerwise` (model.scoring=layerwise) -- per decoder layer, norms, projections, MLP
  and residual adds over `model.loss_chunk` positions at a time, attention over the whole sequence one kv head
  at a time; then the chunked loss: memory = the residual stream + one head's q/k/v + a few chunks.
- chunked: `evaluate.perplexity.window_nll` with model.scoring=standard -- the model's own decoder forward
  (sdpa attention, no KV cache, MLPs chunked), then the LM head and loss `model.loss_chunk` positions at a time:
  memory ~ L x hidden x (a dozen), never L x vocab.
- loss-chunked: the same with the decoder MLPs over the whole sequence at once (what longrope did before it
  ran them `model.loss_chunk` positions at a time, `seqchunk.chunked_mlps`).
- throughput: the forward's FLOPs (`bench_search.forward_flops`) per second, the best of `--repeats` warm
  forwards at the cell's length (a search scores many windows of one length), as a fraction of the fastest fp32
  matmul on as many threads measured in the run (each timing process measures one beside its forwards).
- full: `model(ids, labels=ids)` -- transformers materialises the whole L x vocab logits tensor (and the
  loss makes float copies of it), so memory grows by ~ L x vocab x 4 bytes x a few.

Usage::

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_eval_memory.py                     # testbed, 2k..16k
    python scripts/bench_eval_memory.py --model random --vocab 32000 --lengths 2k,8k  # a Llama-sized vocab
    python scripts/bench_eval_memory.py --json runs/bench-memory.json
    python scripts/bench_eval_memory.py --model llama2-7b-layer --lengths 8k,16k --paths layerwise,chunked  # 7B shape
    python scripts/bench_eval_memory.py --model llama2-7b-layer --layers 2 --device cuda --dtype bfloat16 \
        --lengths 256k,1m,2m --paths layerwise --no-timing             # GPU: 7B-shaped layers at 2048k
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads fight on shared CPUs
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
# one FLOP count and one way to time a call for every benchmark
from bench_search import forward_flops, matmul_flops  # noqa: E402
from bench_search import measure as measure_call  # noqa: E402

PATHS = ("layerwise", "chunked", "loss-chunked", "full")
MIB = 1024 * 1024


def current_rss() -> int:
    """Resident set size now, in bytes (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def load(model_name: str, vocab: int, layers: int = 1):
    import torch

    from longrope_cli.models import load_model

    torch.set_num_threads(min(2, torch.get_num_threads()))
    if model_name not in ("random", "llama2-7b-layer"):
        lm = load_model(model_name, device="cpu", dtype="float32")
        return lm.model, lm.layout
    from transformers import LlamaConfig, LlamaForCausalLM

    from longrope_cli.rope.layout import layout_from_config

    torch.manual_seed(0)
    if model_name == "llama2-7b-layer":  # LLaMA2-7B decoder layers (random weights): the per-token constants
        config = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                             attn_implementation="sdpa")
        return LlamaForCausalLM(config).eval(), layout_from_config(config, name=model_name)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    return model, layout_from_config(config, name="random")


def child(path: str, length: int, model_name: str, vocab: int, chunk: int, kv_group: int | None,
          timing: bool = False, device: str = "cpu", dtype: str = "float32", layers: int = 1,
          repeats: int = 2) -> dict:
    """One measurement in this (fresh) process: memory, or (`timing`) the time of warm forwards.
    On a GPU: the CUDA allocator's peak over what was allocated before the forward."""
    import torch

    from longrope_cli import layerwise
    from longrope_cli.evaluate.perplexity import window_nll
    from longrope_cli.rope.baselines import yarn_factors
    from longrope_cli.rope.rotary import install_factors

    model, layout = load(model_name, vocab, layers)
    model = model.to(device=device, dtype=getattr(torch, dtype))
    cuda = device.startswith("cuda")
    if kv_group is not None:
        layerwise.layerwise_hidden = partial(layerwise.layerwise_hidden, kv_group=kv_group)
    install_factors(model, yarn_factors(layout, length), layout)  # a realistic extension; memory is the same
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    # The weights belong to "before": a checkpoint loads memory-mapped, and each layer's pages would otherwise
    # become resident (and be counted as the window's cost) when the forward first reads them.
    with torch.no_grad():
        sum(float(p.sum()) for p in model.parameters())

    def score(window: torch.Tensor) -> float:
        with torch.no_grad():
            if path in ("layerwise", "chunked", "loss-chunked"):
                nll, count = window_nll(model, window, chunk=chunk, mlp_chunk=0 if path == "loss-chunked" else None,
                                        scoring="layerwise" if path == "layerwise" else "standard")
                return nll / count
            return float(model(input_ids=window, labels=window, use_cache=False).loss)

    if timing:  # the best of `repeats` warm forwards at this length (a search scores many), and a matmul
        score(ids)  # measured beside them
        rate = matmul_flops(torch.device(device), getattr(torch, dtype))
        best = min(measure_call(lambda: score(ids), torch.device(device))[0] for _ in range(repeats))
        return {"path": path, "length": length, "seconds": best, "matmul": rate}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else current_rss()
    started = time.perf_counter()
    loss = score(ids)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        return {"path": path, "length": length, "loss": loss, "seconds": seconds, "rss_before": before,
                "peak": peak, "extra": max(0, peak - before), "vocab": model.config.vocab_size,
                "hidden": model.config.hidden_size, "flops": forward_flops(model.config, length),
                "weights": before, "layers": model.config.num_hidden_layers}
    return {"path": path, "length": length, "loss": loss, "seconds": seconds, "rss_before": before,
            "peak": peak_rss(), "extra": max(0, peak_rss() - before), "vocab": model.config.vocab_size,
            "hidden": model.config.hidden_size, "flops": forward_flops(model.config, length)}


def measure(path: str, length: int, args: argparse.Namespace) -> dict:
    """Memory in one fresh process, time in another (warm, with the allocator's defaults)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", path, "--length", str(length),
               "--model", args.model, "--vocab", str(args.vocab), "--chunk", str(args.chunk),
               "--device", args.device, "--dtype", args.dtype, "--layers", str(args.layers)]
    if args.kv_group:
        command += ["--kv-group", str(args.kv_group)]
    # A fixed mmap threshold makes glibc return every large freed tensor to the OS at once; with its default
    # (dynamic) threshold freed tensors stay in the heap and RSS measures the allocator, not the tensors. It
    # also makes every large allocation fault in fresh pages, so the time is taken in a run without it.
    runs = [(command, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})]
    if not args.no_timing:
        runs.append(([*command, "--timing", "--repeats", str(args.repeats)], dict(os.environ)))
    results = []
    for argv, env in runs:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            return {"path": path, "length": length, "error": tail}
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    memory = results[0]
    memory["memory_run_seconds"] = memory["seconds"]
    if len(results) > 1:
        memory["seconds"], memory["matmul"] = results[1]["seconds"], results[1]["matmul"]
    return memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed", help="testbed, a local HF directory, 'random' (see --vocab), or "
                                                           "llama2-7b-layer (one LLaMA2-7B-shaped layer, fp32)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary of the 'random' model")
    parser.add_argument("--lengths", default="2k,4k,8k,16k")
    parser.add_argument("--paths", default=",".join(PATHS), help="chunked,full")
    parser.add_argument("--chunk", type=int, default=1024, help="loss chunk (recipe: model.loss_chunk)")
    parser.add_argument("--kv-group", type=int, default=None,
                        help="layerwise: kv heads at a time (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (peak from the CUDA allocator)")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--layers", type=int, default=1, help="llama2-7b-layer: decoder layers (1, 2, 4, ...)")
    parser.add_argument("--no-timing", action="store_true", help="skip the separate (warm) timing runs")
    parser.add_argument("--repeats", type=int, default=2, help="timed warm forwards per cell (the best counts)")
    parser.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the measurements to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.length, args.model, args.vocab, args.chunk, args.kv_group,
                               args.timing, args.device, args.dtype, args.layers, args.repeats)))
        return

    from longrope_cli.lengths import format_length, parse_lengths

    if args.model == "testbed":
        from longrope_cli.models import testbed_path

        if not (testbed_path() / "config.json").is_file():
            print("testbed model not built yet; measuring a random Llama instead (--model random)")
            args.model = "random"
    lengths = parse_lengths(args.lengths)
    rows = [measure(path, n, args) for n in lengths for path in args.paths.split(",")]
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))  # as the children run
    # the fastest matmul of the run (the parent's and each timing process's): a shared machine only slows down
    peak_rate = max([matmul_flops(torch.device(args.device), getattr(torch, args.dtype)),
                     *(r["matmul"] for r in rows if "matmul" in r)])
    first = next((r for r in rows if "error" not in r), {})
    print(f"model: {args.model} (vocab {first.get('vocab')}, hidden {first.get('hidden')}), one window, "
          f"fresh process per cell, loss chunk {args.chunk}; fastest matmul of the run {peak_rate / 1e9:.1f} GFLOP/s")
    print(f"{'length':>7} {'path':>9} {'extra peak MiB':>15} {'MiB per 1k tok':>15} {'seconds':>8} "
          f"{'of matmul':>9} {'loss':>8}")
    for row in rows:
        if "error" in row:
            print(f"{format_length(row['length']):>7} {row['path']:>9}  failed: {row['error']}")
            continue
        extra = row["extra"] / MIB
        print(f"{format_length(row['length']):>7} {row['path']:>9} {extra:>15.1f} "
              f"{extra / (row['length'] / 1024):>15.2f} {row['seconds']:>8.2f} "
              f"{row['flops'] / row['seconds'] / peak_rate:>9.2f} {row['loss']:>8.4f}")
    by = {(r["path"], r["length"]): r for r in rows if "error" not in r}
    lo, hi = min(lengths), max(lengths)
    for path in args.paths.split(","):
        if (path, lo) in by and (path, hi) in by and by[(path, lo)]["extra"]:
            ratio = by[(path, hi)]["extra"] / by[(path, lo)]["extra"]
            print(f"{path}: peak growth {format_length(hi)} / {format_length(lo)} = {ratio:.1f}x "
                  f"for {hi / lo:g}x the tokens")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

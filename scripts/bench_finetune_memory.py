#!/usr/bin/env python3
"""GPU memory of one `longrope finetune` step for LLaMA2-7B-shaped layers at 16k..256k tokens.

A 7B model's activation memory is (checkpointed layer inputs) x layers + (one layer recomputed in backward) +
(the loss chunk). This benchmark measures both terms with the shipped trainer (`finetune.Finetune`: LongRoPE
factors installed, activation checkpointing, chunked loss, AdamW) on random-weight models with LLaMA2-7B's
layer shape (hidden 4096, MLP 11008, 32 heads, vocab 32000) and 2 and 4 layers, so that 256k fits one GPU:

    per-layer term = (extra(4 layers) - extra(2 layers)) / 2          extra = peak - memory before the step
    rest           = extra(2 layers) - 2 x per-layer term
    32 layers      = 32 x per-layer term + rest                       (compare with recipes/README.md)

The peak comes in the backward of the top layer, with every checkpointed input still held and only the top
layers' gradients allocated, so gradients are part of `rest`, not of the per-layer term.

Two precisions: `float32` master weights under bf16 autocast (one GPU, `finetune.precision=bf16`) and
`bfloat16` weights, whose activations have the dtypes of FSDP's bf16 compute (the multi-GPU recipe).

Usage (a GPU; about 2 minutes on one H200):

    python scripts/bench_finetune_memory.py
    python scripts/bench_finetune_memory.py --lengths 16k,128k --layers 2,4 --json runs/bench-ft-memory.json
    python scripts/bench_finetune_memory.py --device cpu --hidden 64 --intermediate 172 --heads 2 \
        --vocab 2048 --lengths 1k --layers 1,2        # a smoke run of the same code (no memory numbers on CPU)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads fight on shared CPUs
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from longrope_cli.lengths import format_length, parse_lengths  # noqa: E402
from longrope_cli.models import LoadedModel, testbed_path  # noqa: E402
from longrope_cli.recipe import load_recipe  # noqa: E402
from longrope_cli.rope.baselines import yarn_factors  # noqa: E402
from longrope_cli.rope.layout import layout_from_config  # noqa: E402
from longrope_cli.training.distributed import setup_parallel  # noqa: E402
from longrope_cli.training.trainer import Finetune  # noqa: E402

GIB = 1024**3
ORIGINAL_WINDOW = 4096  # LLaMA2


def build_model(args: argparse.Namespace, layers: int, dtype: torch.dtype, tmp: Path,
                original: int = ORIGINAL_WINDOW) -> LoadedModel:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=ORIGINAL_WINDOW, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(dtype)
    folder = tmp / f"model-{layers}-{str(dtype).removeprefix('torch.')}"
    config.save_pretrained(folder)  # the trainer reads the checkpoint's dtype from config.json
    tokenizer = AutoTokenizer.from_pretrained(testbed_path())  # ids < 2048 < vocab: real text, any vocab
    layout = layout_from_config(config, name="llama2-7b-shape", original_length=original)
    return LoadedModel(model=model, tokenizer=tokenizer, layout=layout, name="llama2-7b-shape", path=folder)


def measure(args: argparse.Namespace, layers: int, dtype_name: str, length: int, tmp: Path) -> dict:
    dtype = getattr(torch, dtype_name)
    # Fine-tuning extends the window: a short smoke length gets a smaller original window (memory does not
    # depend on it).
    lm = build_model(args, layers, dtype, tmp, original=min(ORIGINAL_WINDOW, length // 2))
    factors = tmp / f"factors-{length}.json"
    yarn_factors(lm.layout, length).save(factors, lm.layout)
    recipe = load_recipe(args.recipe, [
        f"model.device={args.device}", f"model.dtype={dtype_name}", f"model.loss_chunk={args.chunk}",
        "data.corpus=testbed", f"data.cache_dir={tmp / 'cache'}", f"finetune.factors={factors}",
        f"finetune.target={length}", "finetune.steps=2", "finetune.batch_size=1", "finetune.micro_batch_size=1",
        "finetune.warmup_steps=0", "finetune.precision=bf16", "finetune.activation_checkpointing=true",
        "finetune.short_batch_size=0", "parallel.fsdp=false", "parallel.context_parallel=1"])
    env = setup_parallel(recipe.parallel, args.device)
    run = Finetune(recipe, tmp / "out", env, lm, progress=False)
    run.setup()
    params = sum(p.numel() for p in lm.model.parameters())
    cuda = env.device.type == "cuda"
    ids = run.windows.batch([0]).to(env.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    tick = time.perf_counter()
    loss = run._micro_step(ids, 1.0, sync=True)  # forward + backward: activations and gradients
    sync()
    seconds = time.perf_counter() - tick
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run.optimizer.step()  # its own peak: the AdamW states (allocated at the first step) and foreach temporaries
    sync()
    peak_optimizer = torch.cuda.max_memory_allocated() if cuda else 0
    run.optimizer.zero_grad(set_to_none=True)
    grads = params * dtype.itemsize
    result = {"layers": layers, "dtype": dtype_name, "length": length, "params": params, "loss": loss,
              "fwd_bwd_s": round(seconds, 3), "tokens_per_s": round(length / seconds, 1),
              "weights_gib": before / GIB, "peak_gib": peak / GIB, "extra_gib": (peak - before) / GIB,
              "grads_gib": grads / GIB, "optimizer_peak_gib": peak_optimizer / GIB}
    del run, lm
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def readme_estimate(args: argparse.Namespace, length: int, layers: int, stream_bytes: int) -> float:
    """recipes/README.md's activation arithmetic (GiB), with the residual stream's real width in bytes."""
    inputs = layers * length * args.hidden * stream_bytes
    recomputed = 1.5 * length * (11 * args.hidden + 4 * args.intermediate) * 2
    loss = 3 * args.chunk * args.vocab * 4
    return (inputs + recomputed + loss) / GIB


def report(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    print("GiB; weights = memory before the step; extra = the forward + backward's peak above them;"
          " optim = the peak during optimizer.step()")
    print(f"{'dtype':9s} {'layers':>6s} {'length':>7s} {'weights':>8s} {'peak':>8s} {'extra':>8s} {'optim':>8s}"
          f" {'fwd+bwd s':>9s} {'tok/s':>9s}")
    for r in rows:
        print(f"{r['dtype']:9s} {r['layers']:6d} {format_length(r['length']):>7s} {r['weights_gib']:8.2f}"
              f" {r['peak_gib']:8.2f} {r['extra_gib']:8.2f} {r['optimizer_peak_gib']:8.2f} {r['fwd_bwd_s']:9.2f}"
              f" {r['tokens_per_s']:9,.0f}")
    fits = []
    lo, hi = min(args.layer_counts), max(args.layer_counts)
    if lo == hi or args.device == "cpu":
        return fits
    print(f"\nper-layer and fixed activation terms, and a 32-layer ({args.hidden}-wide) model:")
    print(f"{'dtype':9s} {'length':>7s} {'B/token/layer':>14s} {'rest GiB':>9s} {'32 layers GiB':>14s}"
          f" {'README est. GiB':>16s}")
    by_key = {(r["dtype"], r["layers"], r["length"]): r for r in rows}
    for dtype in args.dtypes:
        for length in args.length_list:
            a, b = by_key.get((dtype, lo, length)), by_key.get((dtype, hi, length))
            if not (a and b):
                continue
            per_layer = (b["extra_gib"] - a["extra_gib"]) / (hi - lo)
            rest = a["extra_gib"] - lo * per_layer
            full = 32 * per_layer + rest
            estimate = readme_estimate(args, length, 32, 2)
            fits.append({"dtype": dtype, "length": length, "per_layer_gib": per_layer, "rest_gib": rest,
                         "layers32_gib": full, "readme_estimate_gib": estimate})
            print(f"{dtype:9s} {format_length(length):>7s} {per_layer * GIB / length:14,.0f} {rest:9.2f}"
                  f" {full:14.1f} {estimate:16.1f}")
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "recipes/llama2-7b-2m.yaml"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--lengths", default="16k,64k,256k")
    parser.add_argument("--layers", default="2,4", help="layer counts of the LLaMA2-7B-shaped models")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="weights: float32 (autocast) and/or bfloat16")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=4096, help="loss chunk (the 7B recipe's model.loss_chunk)")
    parser.add_argument("--json", default=None, help="also write the measurements to this file")
    args = parser.parse_args()
    args.length_list = parse_lengths(args.lengths)
    args.layer_counts = [int(x) for x in args.layers.split(",")]
    args.dtypes = args.dtypes.split(",")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_finetune_memory: no CUDA GPU here, skipped (--device cpu with small shapes runs the same code)")
        return
    if args.device.startswith("cuda"):
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            for layers in args.layer_counts:
                for length in args.length_list:
                    rows.append(measure(args, layers, dtype, length, Path(tmp)))
                    print(json.dumps(rows[-1]), flush=True)
    fits = report(args, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "fits": fits}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

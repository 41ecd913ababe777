#!/usr/bin/env python3
"""Why the search can (or cannot) beat YaRN on a model: where the loss goes and which pairs matter.

1. Loss by position: mean NLL per block of positions at the target length (eval split), for plain RoPE, PI,
   YaRN and any factor files given, next to the 1x loss of the same text cut into original-window pieces.
   A model that uses long context gets better with position; one whose extension only has to avoid harm
   (its best case is the 1x loss) leaves little for any factor set to win.
2. Pair sensitivity around YaRN: each group of frequency pairs set to 1 (extrapolate), to s (interpolate
   like PI) and to 1.25 s, the others kept at YaRN: the perplexity change says which pairs the search can
   move for a gain, and how flat the space around YaRN is.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_diagnose.py --target 2k
    python scripts/bench_diagnose.py --target 2k --factors runs/bench-quality/2k-paper-200/seed0
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import math  # noqa: E402
from dataclasses import replace  # noqa: E402

import torch  # noqa: E402

from longrope_cli.data import load_windows, split_windows  # noqa: E402
from longrope_cli.evaluate.perplexity import score_perplexity  # noqa: E402
from longrope_cli.lengths import format_length, parse_length  # noqa: E402
from longrope_cli.losses import decoder_of  # noqa: E402
from longrope_cli.models import load_model  # noqa: E402
from longrope_cli.recipe import load_recipe  # noqa: E402
from longrope_cli.rope.baselines import baseline_factors  # noqa: E402
from longrope_cli.rope.factors import load_factors  # noqa: E402
from longrope_cli.rope.rotary import install_factors, remove_factors  # noqa: E402


@torch.no_grad()
def token_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """(N, L - 1) per-token NLL."""
    out = []
    for row in windows:
        hidden = decoder_of(model)(input_ids=row.view(1, -1), use_cache=False).last_hidden_state
        logits = model.lm_head(hidden)[0, :-1].float()
        out.append(torch.nn.functional.cross_entropy(logits, row[1:], reduction="none"))
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--corpus", default="testbed")
    parser.add_argument("--target", default="2k")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--groups", type=int, default=8, help="pair groups for the sensitivity scan")
    parser.add_argument("--factors", nargs="*", default=[], help="factor files to add to part 1")
    args = parser.parse_args()
    lm = load_model(args.model, device="cpu")
    layout, target = lm.layout, parse_length(args.target, "--target")
    s, original = layout.scale(target), layout.original_length
    data = load_recipe(None, [f"data.corpus={args.corpus}"]).data
    windows = load_windows(data, lm.tokenizer, "eval", target, args.windows)

    # 1. loss by position block
    blocks = max(1, int(s))
    edges = [round(k * (target - 1) / blocks) for k in range(blocks + 1)]
    remove_factors(lm.model)
    short = split_windows(windows, original, lm.tokenizer.bos_token_id)
    one_x = token_nll(lm.model, short).mean().item()
    methods = {m: baseline_factors(m, layout, target) for m in ("none", "pi", "yarn")}
    for path in args.factors:
        methods[path.rstrip("/").split("/")[-2 if path.endswith("json") else -1]] = load_factors(path, layout)
    print(f"1. mean NLL by position block at {format_length(target)} ({s:g}x), {args.windows} eval windows; "
          f"the same text at 1x (windows of {original}): {one_x:.4f} (perplexity {math.exp(one_x):.2f})\n")
    header = ["method", *(f"{edges[k]}-{edges[k + 1]}" for k in range(blocks)), "all (ppl)"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, factors in methods.items():
        install_factors(lm.model, factors, layout)
        nll = token_nll(lm.model, windows)
        cells = [f"{nll[:, edges[k]:edges[k + 1]].mean().item():.3f}" for k in range(blocks)]
        print(f"| {name} | " + " | ".join(cells) + f" | {nll.mean().item():.4f} ({math.exp(nll.mean().item()):.2f}) |")

    # 2. pair sensitivity around YaRN
    yarn = methods["yarn"]
    base = score_perplexity(lm.model if install_factors(lm.model, yarn, layout) else lm.model, windows).perplexity
    per = max(1, layout.pairs // args.groups)
    print(f"\n2. perplexity change when a group of pairs leaves YaRN (YaRN: {base:.3f}); pairs high -> low frequency\n")
    print("| pairs | YaRN lambda | -> 1 | -> s | -> 1.25 s |\n|---|---|---|---|---|")
    for start in range(0, layout.pairs, per):
        group = range(start, min(start + per, layout.pairs))
        cells = []
        for value in (1.0, s, 1.25 * s):
            lam = list(yarn.long_factor)
            for i in group:
                lam[i] = value
            lam = [max(lam[: i + 1]) for i in range(len(lam))]  # keep it non-decreasing
            install_factors(lm.model, replace(yarn, long_factor=tuple(lam)), layout)
            cells.append(f"{score_perplexity(lm.model, windows).perplexity - base:+.3f}")
        span = f"{yarn.long_factor[group[0]]:.2f}-{yarn.long_factor[group[-1]]:.2f}"
        print(f"| {group[0]}-{group[-1]} | {span} | " + " | ".join(cells) + " |")
    remove_factors(lm.model)


if __name__ == "__main__":
    main()

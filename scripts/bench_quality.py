#!/usr/bin/env python3
"""Search quality on the CPU test bed: does the search beat YaRN on text it never saw?

Without fine-tuning, at one target (8x: 2k on the 256-token test bed), every row is scored on two held-out
corpora: the test bed's eval split (*Persuasion*, a book the search never scored) and the Jargon File
(another domain). Rows: none, PI, NTK, dynamic NTK, YaRN, and searches (one per seed) with each addition
alone and together, like the paper's table 11:

    paper         lambda only, n-hat 0, su temperature (the paper's algorithm, exportable)
    +n-hat        n-hat searched as well (not exportable: scored with longrope's rotary module)
    +temperature  search.attention_search (LongRoPE2's second stage)
    +critical     search.critical_dim=auto (LongRoPE2's critical dimension)
    +critical-search  search.critical_dim=search (the boundary moved first: auto +- 4 or off, by best seed)
    +validation   search.validate_top=8 on 5 fresh search-split windows
    all           +temperature +critical +validation, n-hat 0
    default       the recipe defaults as they are, n-hat 0 (run with --default-evals)

Exportable rows are scored the way a user would: exported with `longrope export`'s code and loaded by plain
transformers (no longrope code on the forward path). Mean and spread over seeds, evaluations and search
seconds per row. Resumable: every search folder and every score is kept under --out; rerun the same command
after a kill (or to add seeds / rows) and only what is missing runs.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_quality.py                          # 8x ablation, 3 seeds x 200
    python scripts/bench_quality.py --rows default --evals 600                      # the default at 600
    python scripts/bench_quality.py --target 4k --rows yarn,default --seeds 0      # 16x
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from longrope_cli.data import load_windows  # noqa: E402
from longrope_cli.evaluate.perplexity import score_perplexity  # noqa: E402
from longrope_cli.lengths import format_length, parse_length  # noqa: E402
from longrope_cli.models import load_model  # noqa: E402
from longrope_cli.outputs import atomic_write_json, is_complete  # noqa: E402
from longrope_cli.recipe import load_recipe  # noqa: E402
from longrope_cli.rope.baselines import baseline_factors  # noqa: E402
from longrope_cli.rope.export import export_model  # noqa: E402
from longrope_cli.rope.factors import load_factors  # noqa: E402
from longrope_cli.rope.rotary import install_factors, remove_factors  # noqa: E402
from longrope_cli.stages.search import run_search  # noqa: E402

BASELINES = ("none", "pi", "ntk", "dynamic-ntk", "yarn")
OFF = ["search.attention_search=false"]  # pinned, so that each row adds one thing to the paper's algorithm
SEARCH_ROWS: dict[str, list[str]] = {
    "paper": ["search.start_tokens=0", *OFF],
    "+n-hat": [*OFF],
    "+temperature": ["search.start_tokens=0", "search.attention_search=true"],
    "+critical": ["search.start_tokens=0", "search.critical_dim=auto", *OFF],
    "+critical-search": ["search.start_tokens=0", "search.critical_dim=search", *OFF],
    "+validation": ["search.start_tokens=0", "search.validate_top=8", "search.validate_documents=5", *OFF],
    "all": ["search.start_tokens=0", "search.attention_search=true", "search.critical_dim=auto",
            "search.validate_top=8", "search.validate_documents=5"],
    "default": ["search.start_tokens=0"],  # the recipe defaults, n-hat 0 so that the export is the product
}
CORPORA = {"eval split (Persuasion)": "testbed", "Jargon File": "jargon"}


def plain_transformers_perplexity(model_dir: Path, windows: torch.Tensor) -> float:
    """Token-weighted perplexity of `windows` under the exported directory, loaded by plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = model(row.view(1, -1), use_cache=False).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
            count += row.numel() - 1
    return math.exp(total / count)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.scores_path = self.out / "scores.json"
        self.scores: dict = json.loads(self.scores_path.read_text()) if self.scores_path.is_file() else {}
        torch.set_num_threads(args.threads) if args.threads else None
        self.lm = load_model(args.model, device="cpu")
        self.target = parse_length(args.target, "--target")
        self.windows = {name: load_windows(load_recipe(None, [f"data.corpus={corpus}"]).data, self.lm.tokenizer,
                                           "eval", self.target, args.eval_windows)
                        for name, corpus in CORPORA.items()}

    def _save(self) -> None:
        atomic_write_json(self.scores_path, self.scores)

    def score(self, key: str, factors, export_dir: Path | None) -> dict[str, float]:
        """Perplexity on each corpus: through a plain-transformers export when `export_dir` is given."""
        if key in self.scores:
            return self.scores[key]
        result = {}
        if export_dir is not None:
            if not (export_dir / "config.json").is_file():
                export_model(self.lm.model, self.lm.tokenizer, factors, self.lm.layout, export_dir, self.target)
            for name, windows in self.windows.items():
                result[name] = plain_transformers_perplexity(export_dir, windows)
        else:
            install_factors(self.lm.model, factors, self.lm.layout)
            for name, windows in self.windows.items():
                result[name] = score_perplexity(self.lm.model, windows).perplexity
            remove_factors(self.lm.model)
        self.scores[key] = result
        self._save()
        return result

    def search(self, row: str, seed: int, evals: int) -> tuple[Path, dict]:
        folder = self.out / f"{format_length(self.target)}-{row}-{evals}" / f"seed{seed}"
        if not is_complete(folder):
            recipe = load_recipe(None, [f"model.name={self.args.model}", "model.device=cpu", "data.corpus=testbed",
                                        f"search.target={self.target}", f"search.seed={seed}",
                                        f"search.max_evals={evals}", *SEARCH_ROWS[row]])
            print(f"== search {row} seed {seed} ({evals} evaluations)", flush=True)
            run_search(recipe, folder, resume=(folder / "state.json").is_file(), lm=self.lm, progress=False)
        complete = json.loads((folder / "complete.json").read_text())
        return folder, complete

    def run(self) -> list[list[str]]:
        args, rows = self.args, []
        s = self.lm.layout.scale(self.target)
        for row in args.rows.split(","):
            if row in BASELINES:
                factors = baseline_factors(row, self.lm.layout, self.target)
                export = None if row == "none" else self.out / "exports" / f"{format_length(self.target)}-{row}"
                scores = [self.score(f"{format_length(self.target)} {row}", factors, export)]
                rows.append(self._row(row, scores, None, None))
                continue
            evals = args.default_evals if row == "default" else args.evals
            scores, used, seconds = [], [], []
            for seed in (int(x) for x in args.seeds.split(",")):
                folder, complete = self.search(row, seed, evals)
                factors = load_factors(folder / "factors.json", self.lm.layout)
                export = None if factors.start_tokens else self.out / "exports" / f"{folder.parent.name}-{seed}"
                scores.append(self.score(f"{folder.parent.name} seed{seed}", factors, export))
                used.append(complete.get("evaluations", 0))
                seconds.append(complete.get("seconds", 0.0))
            rows.append(self._row(f"{row} ({evals})", scores, used, seconds))
        print(f"\n{format_length(self.target)} ({s:g}x), {args.eval_windows} windows per corpus; mean +- spread "
              f"(stdev) over seeds; gain = 1 - ppl / YaRN's\n")
        yarn = self.scores.get(f"{format_length(self.target)} yarn")
        header = ["row", *CORPORA, *(f"gain vs YaRN, {name.split(' ')[0]}" for name in CORPORA), "evals", "search s"]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            cells = [row["name"]]
            for name in CORPORA:
                cells.append(_mean_spread(row["ppl"][name]))
            for name in CORPORA:
                cells.append(_mean_spread([100 * (1 - v / yarn[name]) for v in row["ppl"][name]], "%")
                             if yarn else "")
            cells += [row["evals"], row["seconds"]]
            print("| " + " | ".join(cells) + " |")
        return rows

    @staticmethod
    def _row(name, scores, used, seconds) -> dict:
        return {"name": name, "ppl": {c: [s[c] for s in scores] for c in CORPORA},
                "evals": f"{statistics.mean(used):.0f}" if used else "",
                "seconds": f"{statistics.mean(seconds):.0f}" if seconds else ""}


def _mean_spread(values: list[float], unit: str = "") -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}{unit}"
    return f"{statistics.mean(values):.2f}{unit} +- {statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed")
    parser.add_argument("--target", default="2k")
    parser.add_argument("--rows", default="none,pi,ntk,dynamic-ntk,yarn,paper,+n-hat,+temperature,+critical,"
                                          "+critical-search,+validation,all")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--evals", type=int, default=200, help="evaluations per ablation search")
    parser.add_argument("--default-evals", type=int, default=600, help="evaluations of the `default` row")
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows per corpus")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/bench-quality")
    args = parser.parse_args()
    started = time.time()
    Bench(args).run()
    print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()

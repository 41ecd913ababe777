"""`longrope eval`: perplexity across lengths and passkey retrieval, for baselines and factor files."""

from __future__ import annotations

import click

from longrope_cli.cli.common import build_stage_recipe, open_stage_dir, recipe_arguments, user_errors

EPILOG = """\b
Examples:
  $ longrope eval --model testbed --lengths 256,512,1k,2k,4k --methods none,pi,ntk,yarn,runs/search-2k/factors.json
  $ longrope eval --model testbed --lengths 256,1k,4k --passkey-lengths 256,1k --passkey-trials 10 --out runs/eval
  $ longrope eval --model testbed --lengths 1k,2k eval.mode=sliding eval.stride=256 --out runs/eval-sliding
  $ longrope eval --model testbed --lengths 256,2k,4k --documents 8 eval.mode=same-text   # same tokens at every length
  $ longrope eval recipes/tiny.yaml --out runs/eval --resume      # continue a crashed run
  $ longrope eval --model ./llama2-7b --lengths 4k,8k,16k,32k --methods none,yarn,final/factors.json --device cuda

\b
Methods: none, pi, ntk, dynamic-ntk, yarn (generated for each length) and factor files
(factors.json of a stage folder, or the official search's result_final.csv).
Writes OUT/results.json, OUT/ppl_vs_length.png, OUT/passkey.png, OUT/factors.png; finished
(method, length) cells are kept in OUT/cells/ and reused by --resume.
"""


@click.command(epilog=EPILOG)
@recipe_arguments
@click.option("--lengths", default=None, help="Perplexity lengths, e.g. 4k,8k,16k (recipe: eval.lengths).")
@click.option("--methods", default=None,
              help="Comma-separated baselines and factor files, e.g. none,pi,ntk,yarn,run/factors.json "
                   "(recipe: eval.methods).")
@click.option("--documents", type=int, default=None, help="Eval-split windows per length (recipe: eval.documents).")
@click.option("--passkey-lengths", default=None,
              help="Passkey lengths, e.g. 4k,8k; empty = no passkey test (recipe: eval.passkey_lengths).")
@click.option("--passkey-trials", type=int, default=None, help="Trials per (length, depth) (recipe: eval.passkey_trials).")
@user_errors
def evaluate(args: tuple[str, ...], model: str | None, out: str | None, device: str | None, resume: bool | None,
             progress: bool, lengths: str | None, methods: str | None, documents: int | None,
             passkey_lengths: str | None, passkey_trials: int | None) -> None:
    """Perplexity at several lengths and passkey retrieval for each method; a table, results.json and plots.

    Takes an optional RECIPE.yaml (its `eval:` section), then key=value overrides, then flags."""

    from longrope_cli.report import PLOTS, print_report
    from longrope_cli.stages.evaluate import run_eval

    flags = {
        "model.name": model, "model.device": device, "output.dir": out, "output.resume": resume,
        "eval.lengths": lengths, "eval.methods": methods, "eval.documents": documents,
        "eval.passkey_lengths": passkey_lengths, "eval.passkey_trials": passkey_trials,
    }
    recipe = build_stage_recipe(args, flags)
    out_dir = open_stage_dir(recipe, "eval")
    results_path = run_eval(recipe, out_dir, resume=recipe.output.resume, progress=progress).artifact

    import json

    print_report(json.loads(results_path.read_text(encoding="utf-8")))
    click.echo(f"results: {results_path}")
    for name in PLOTS:
        if (out_dir / name).is_file():
            click.echo(f"plot:    {out_dir / name}")

"""`longrope search`: evolutionary search for LongRoPE factors at a target length."""

from __future__ import annotations

import click

from longrope_cli.cli.common import build_stage_recipe, open_stage_dir, recipe_arguments, user_errors

EPILOG = """\b
Examples:
  $ longrope search --model testbed --target 2k --out runs/search-2k
  $ longrope search --model testbed --target 2k --max-evals 200 search.racing=true search.patience=5
  $ longrope search recipes/llama2-7b-2m.yaml --target 256k search.start_tokens=0   # exportable
  $ longrope search --model testbed --target 2k --out runs/search-2k --resume      # after a kill
  $ longrope search --model ./ft-256k --target 2048k search.base_factors=./ft-256k/factors.json
  $ torchrun --nproc-per-node 8 -m longrope_cli search recipe.yaml search.backend=distributed
  $ torchrun --nproc-per-node 8 -m longrope_cli search recipe.yaml --target 2048k search.backend=distributed parallel.context_parallel=2
  $ srun --kill-on-bad-exit=1 --ntasks-per-node 8 longrope search recipe.yaml search.backend=distributed
"""


@click.command(epilog=EPILOG)
@recipe_arguments
@click.option("--target", default=None, help="Target context length, e.g. 256k (recipe: search.target).")
@click.option("--max-evals", type=int, default=None, help="Stop after N fitness evaluations (recipe: search.max_evals).")
@user_errors
def search(args: tuple[str, ...], model: str | None, out: str | None, device: str | None, resume: bool | None,
           progress: bool, target: str | None, max_evals: int | None) -> None:
    """Search per-frequency rescale factors (and n-hat) that minimise perplexity at --target.

    Writes OUT/factors.json (best so far after every generation; per-pair list under long_factor),
    OUT/candidates.jsonl (every scored candidate) and OUT/state.json (checkpoint for --resume).
    Every recipe key of the search: section is listed by `longrope recipe fields`."""
    from longrope_cli.runtime import is_main_process
    from longrope_cli.stages.search import run_search

    recipe = build_stage_recipe(args, {
        "model.name": model, "model.device": device, "output.dir": out, "search.target": target,
        "search.max_evals": max_evals, "output.resume": resume,
    })
    out_dir = open_stage_dir(recipe, "search", recipe.search.target)
    result = run_search(recipe, out_dir, resume=recipe.output.resume, progress=progress and is_main_process())
    if is_main_process():
        refined = result.summary.get("refine_evaluations", 0)
        click.echo(f"best perplexity {result.best_perplexity:.4f} after {result.evaluations} evaluations"
                   f"{f' (+{refined} refining)' if refined else ''} ({result.stopped}); factors: {result.factors_path}")

"""`longrope finetune`: continued pre-training with a factor file installed (see longrope_cli.stages.finetune)."""

from __future__ import annotations

import click

from longrope_cli.cli.common import build_stage_recipe, open_stage_dir, recipe_arguments, user_errors

EPILOG = """\b
Examples:
  $ longrope finetune --model testbed --factors runs/search-2k/factors.json --target 2k --steps 40
  $ longrope finetune recipes/tiny.yaml finetune.factors=runs/tiny/search-2k --out runs/ft-2k
  $ longrope finetune recipes/tiny.yaml --factors runs/search-2k --out runs/ft-2k --resume   # after a kill
  $ torchrun --nproc-per-node 2 -m longrope_cli finetune recipes/tiny.yaml --factors runs/search-2k   # 2 CPU ranks
  $ torchrun --nproc-per-node 8 -m longrope_cli finetune recipes/llama2-7b-2m.yaml parallel.fsdp=true \\
        --factors runs/llama2-7b-2m/search-128k --target 128k --out runs/ft-128k
\b
Output: OUT/model/ (Hugging Face directory), OUT/factors.json, OUT/metrics.jsonl, OUT/checkpoint/
(every finetune.save_every steps and on SIGTERM; --resume continues from it). All keys:
`longrope recipe fields`.
"""


@click.command(epilog=EPILOG)
@recipe_arguments
@click.option("--target", default=None, help="Training sequence length, e.g. 2k or 128k (recipe: finetune.target; "
                                             "default: the factor file's target).")
@click.option("--factors", default=None, help="Factor file or stage folder from `longrope search` "
                                              "(recipe: finetune.factors).")
@click.option("--steps", type=int, default=None, help="Optimizer steps (recipe: finetune.steps).")
@user_errors
def finetune(args: tuple[str, ...], model: str | None, out: str | None, device: str | None, resume: bool | None,
             progress: bool, target: str | None, factors: str | None, steps: int | None) -> None:
    """Fine-tune a model with LongRoPE factors installed at the target length (AdamW, warm-up then
    linear / constant / cosine, gradient accumulation, activation checkpointing, chunked loss).

    Runs as one process, or under torchrun with DDP / FSDP2 (parallel.fsdp=true) and, on GPUs,
    context parallel (parallel.context_parallel=N)."""
    from longrope_cli.runtime import is_main_process
    from longrope_cli.stages.finetune import run_finetune

    recipe = build_stage_recipe(args, {
        "model.name": model, "model.device": device, "output.dir": out, "output.resume": resume,
        "finetune.target": target, "finetune.factors": factors, "finetune.steps": steps,
    })
    out_dir = open_stage_dir(recipe, "finetune", recipe.finetune.target)
    result = run_finetune(recipe, out_dir, resume=recipe.output.resume, progress=progress)
    if is_main_process():
        click.echo(f"fine-tuned model: {result.artifact}")

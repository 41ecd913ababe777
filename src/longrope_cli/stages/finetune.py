"""`longrope finetune`: continued pre-training with a factor file installed at the target length.

The paper's settings (LongRoPE, section 4.1): LLaMA2, AdamW at lr 2e-5 with linear decay, global batch
32, 400 steps at 128k, then 600 more at 256k from that model; Mistral, constant lr 1e-6, batch 64,
400 steps (on 16k sequences, following YaRN). The training loop is `training.trainer.Finetune`.

    $ longrope finetune recipes/tiny.yaml --factors runs/search-2k --target 2k --steps 40
    $ torchrun --nproc-per-node 8 -m longrope_cli finetune RECIPE parallel.fsdp=true     # see training/distributed.py

Writes OUT/model/ (a Hugging Face directory; its config carries the factors when n-hat = 0),
OUT/factors.json (the factors trained with: later stages install factors relative to it),
OUT/metrics.jsonl (one line per step), and OUT/checkpoint/ every `finetune.save_every` steps and on
SIGTERM / SIGUSR1 (SLURM preemption); `--resume` continues at the same step with the same batches.
"""

from __future__ import annotations

import logging
from pathlib import Path

from longrope_cli.models import LoadedModel
from longrope_cli.outputs import COMPLETE_MARKER, is_complete
from longrope_cli.recipe import Recipe
from longrope_cli.stages.folder import StageResult, completed_result, refuse_overwrite, stage_folder
from longrope_cli.training.checkpoint import CHECKPOINT
from longrope_cli.training.distributed import setup_parallel
from longrope_cli.training.trainer import Finetune

log = logging.getLogger(__name__)


def run_finetune(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, lm: LoadedModel | None = None,
                 progress: bool = True) -> StageResult:
    """Fine-tune `recipe.model` with `recipe.finetune.factors` installed; the artifact is `out_dir/model`.

    Example (the test bed, a few minutes on 2 CPU cores):
        >>> run_finetune(load_recipe("recipes/tiny.yaml", ["finetune.factors=runs/search-2k"]),
        ...              "runs/finetune-2k").artifact  # doctest: +SKIP
    """
    out = Path(out_dir)
    if resume and is_complete(out) and (out / "model" / "config.json").is_file():
        log.info("%s is complete; nothing to resume", out)
        return completed_result("finetune", out)
    env = setup_parallel(recipe.parallel, recipe.model.device if lm is None else str(lm.device))
    try:
        with stage_folder("finetune", recipe, out) as folder:
            refuse_overwrite(out, "finetune", resume, COMPLETE_MARKER, CHECKPOINT, CHECKPOINT + ".old")
            run = Finetune(recipe, out, env, lm, progress)
            run.setup()
            start = run.restore(resume)  # refuses a checkpoint made with other settings
            folder.open()  # every check above: a refused fine-tune leaves OUT as it was
            run.train(start)
            return run.finish(folder.complete)
    finally:
        env.close()

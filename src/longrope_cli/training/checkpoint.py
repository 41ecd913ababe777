"""Training checkpoints (resume at the same step) and the final Hugging Face model directory.

A checkpoint is a torch.distributed.checkpoint (DCP) folder: each rank writes its own shards of the
weights and AdamW states (FSDP never gathers them on one rank), so it reloads on any number of ranks.
Beside it: trainer.json (step, scheduler, settings) and rng-<rank>.pt. It is written to
`checkpoint.partial/` and renamed into place, so a kill mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from longrope_cli.outputs import atomic_write_json
from longrope_cli.rope.export import exportable_config, write_model_folder
from longrope_cli.rope.factors import FactorSet
from longrope_cli.rope.layout import RopeLayout
from longrope_cli.training.distributed import ParallelEnv

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
TRAINER_FILE = "trainer.json"


def find_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint in `out` (a save interrupted between two renames leaves `.old`)."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        if (out / name / TRAINER_FILE).is_file():
            return out / name
    return None


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAINER_FILE).read_text(encoding="utf-8"))


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    env: ParallelEnv, trainer: dict[str, Any]) -> Path:
    """Collective: every rank writes its shards; rank 0 renames the folder into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp, final, old = out / (CHECKPOINT + ".partial"), out / CHECKPOINT, out / (CHECKPOINT + ".old")
    if env.is_main and tmp.exists():
        shutil.rmtree(tmp)
    env.barrier()
    model_state, optim_state = get_state_dict(module, optimizer)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng-{env.rank}.pt")
    env.barrier()
    if env.is_main:
        atomic_write_json(tmp / TRAINER_FILE, {**trainer, "scheduler": scheduler.state_dict(), "world_size": env.world})
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
    env.barrier()
    return final


def load_checkpoint(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    env: ParallelEnv) -> dict[str, Any]:
    """Collective: restore weights, AdamW states, scheduler and this rank's RNG; returns trainer.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = read_trainer_state(path)
    scheduler.load_state_dict(trainer["scheduler"])
    rng = path / f"rng-{env.rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return trainer


def full_model_state(module: nn.Module, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Collective: the unsharded weights on rank 0 (on the CPU), without the loss wrapper's `prefix`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix(prefix): v for k, v in state.items()}


def source_dtype(model_dir: Path, model: nn.Module) -> torch.dtype:
    """The dtype the weights came in (the paper keeps the checkpoint's precision); float32 if unknown."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        name = config.get("dtype") or config.get("torch_dtype")
        if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
    except (OSError, ValueError):
        pass
    return next(model.parameters()).dtype


def save_hf_model(model: Any, tokenizer: Any, state: dict[str, torch.Tensor], factors: FactorSet,
                  layout: RopeLayout, target: int, out: Path, dtype: torch.dtype) -> Path:
    """Write `out` as a plain Hugging Face directory (transformers' own rotary module, longrope config).

    With n-hat = 0 the config carries the factors (`rope_type: longrope`, see rope/export.py) and plain
    transformers runs the model as trained. transformers cannot express n-hat > 0: the config then keeps
    plain RoPE and says so under `longrope`; install `factors.json` with longrope to run it as trained.
    """
    state = {k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}

    def edit(config: dict[str, Any]) -> dict[str, Any]:
        config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
        if factors.start_tokens == 0 and target > layout.original_length:
            return exportable_config(config, factors, layout, target)
        plain = {"rope_type": "default", "rope_theta": layout.rope_theta}
        config.update(rope_parameters=plain, rope_scaling=None, max_position_embeddings=layout.original_length,
                      rope_theta=layout.rope_theta)
        config["longrope"] = {
            "factors": "factors.json",
            "note": f"trained with n-hat={factors.start_tokens} start tokens, which transformers' longrope cannot "
                    "express: this config runs plain RoPE; load with longrope_cli.install_factors(model, "
                    "load_factors('factors.json')) to run the model as trained"}
        log.warning("n-hat = %d: %s/config.json keeps plain RoPE; later stages install factors.json",
                    factors.start_tokens, out)
        return config

    return write_model_folder(model, tokenizer, out, factors, layout, edit, state=state)

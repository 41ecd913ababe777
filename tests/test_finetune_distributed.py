"""Two gloo ranks under torchrun (DDP and FSDP2) train to the same weights as one process.

Each launch starts two Python processes that import torch and transformers (about 15 s on 2 cores),
so these are integration tests: `make test` runs them, plain `pytest` does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from longrope_cli.models import load_model
from longrope_cli.outputs import is_complete
from longrope_cli.recipe import load_recipe
from longrope_cli.rope.baselines import yarn_factors
from longrope_cli.stages.finetune import run_finetune
from longrope_cli.training.checkpoint import find_checkpoint, read_trainer_state

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def recipe_file(tiny_model_dir, tiny_corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    lm = load_model(str(tiny_model_dir), device="cpu")
    yarn_factors(lm.layout, 128).save(root / "yarn-128.json", lm.layout)
    recipe = {
        "model": {"name": str(tiny_model_dir), "device": "cpu"},
        "data": {"corpus": str(tiny_corpus), "cache_dir": str(root / "cache")},
        "finetune": {"factors": str(root / "yarn-128.json"), "target": 128, "steps": 4, "batch_size": 4,
                     "micro_batch_size": 1, "lr": 2e-3, "warmup_steps": 1, "save_every": 2},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def single(recipe_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    run_finetune(load_recipe(recipe_file), out, progress=False)
    return out


def torchrun(recipe_file: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONFAULTHANDLER": "1"}  # a rare exit -6 at teardown (README, known issue): show the Python stacks
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "longrope_cli", "finetune", str(recipe_file), "--out", str(out), "--no-progress", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def assert_close_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=2e-5, rtol=1e-4, msg=key)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_gloo_ranks_match_one_process(recipe_file, single, tmp_path, fsdp):
    out = tmp_path / "run"
    done = torchrun(recipe_file, out, f"parallel.fsdp={str(fsdp).lower()}")
    assert done.returncode == 0, done.stderr[-8000:]
    assert is_complete(out)
    assert losses(out) == pytest.approx(losses(single), abs=1e-4)
    assert_close_weights(out, single)


SIGTERM_WORKER = """
import signal, sys
from longrope_cli.recipe import load_recipe
from longrope_cli.stages import finetune as ft
from longrope_cli.training.trainer import Finetune

real_step = Finetune.step

def step(self, index):
    result = real_step(self, index)
    if index == 2 and self.env.rank == 1:  # one rank only: the others must learn it from the all-reduce
        signal.raise_signal(signal.SIGTERM)
    return result

Finetune.step = step
ft.run_finetune(load_recipe(sys.argv[1], ["parallel.fsdp=true"]), sys.argv[2], progress=False)
"""


def test_sigterm_on_one_rank_checkpoints_all_and_resumes(recipe_file, single, tmp_path):
    out = tmp_path / "run"
    worker = tmp_path / "worker.py"
    worker.write_text(SIGTERM_WORKER, encoding="utf-8")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONFAULTHANDLER": "1"}  # a rare exit -6 at teardown (README, known issue): show the Python stacks
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(worker), str(recipe_file), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Preempted" in done.stderr + done.stdout, done.stderr[-8000:]
    assert read_trainer_state(find_checkpoint(out))["step"] == 3
    resumed = torchrun(recipe_file, out, "--resume", "parallel.fsdp=true")
    assert resumed.returncode == 0, resumed.stderr[-8000:]
    assert_close_weights(out, single)


# --------------------------------------------------------------------------- GPUs (skipped without them)


@pytest.mark.gpu
def test_bf16_on_one_gpu_trains_and_saves_the_source_dtype(recipe_file, tmp_path):
    out = tmp_path / "gpu"
    run_finetune(load_recipe(recipe_file, ["model.device=cuda", "finetune.precision=bf16", "finetune.steps=6"]), out,
                 progress=False)
    rows = losses(out)
    assert rows[-1] < rows[0]
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["dtype"] == "float32"  # fp32 master weights, saved as the checkpoint came


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_context_parallel_on_two_gpus_matches_one_gpu(recipe_file, tmp_path):
    """Each sequence split over 2 GPUs (ring attention) gives the loss of the whole sequence on one GPU."""
    settings = ["model.device=cuda", "finetune.precision=fp32", "finetune.micro_batch_size=1"]
    one = tmp_path / "one"
    run_finetune(load_recipe(recipe_file, settings), one, progress=False)
    two = tmp_path / "cp2"
    done = torchrun(recipe_file, two, *settings, "parallel.context_parallel=2", "parallel.fsdp=true")
    assert done.returncode == 0, done.stderr[-8000:]
    assert losses(two) == pytest.approx(losses(one), rel=2e-3)

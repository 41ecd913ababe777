"""Which GPU a rank takes, and CPU ranks on a machine that has GPUs (found on a 1-GPU machine: FSDP2's default
mesh sent CPU rank 1 to a GPU that did not exist)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.device_mesh
import torch.distributed.fsdp

from conftest import tiny_llama
from longrope_cli.errors import RecipeError
from longrope_cli.recipe import ParallelConfig
from longrope_cli.runtime import local_gpu, uses_cuda
from longrope_cli.training.distributed import ParallelEnv, setup_parallel, wrap_for_training


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_torchrun_ranks_take_their_local_gpu_and_refuse_a_missing_one(one_gpu, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert local_gpu(0) == 0
    with pytest.raises(RecipeError, match=r"local rank 1 has no GPU.*--nproc-per-node 1.*model.device=cpu"):
        local_gpu(1)


def test_srun_tasks_bound_to_their_own_gpu_take_it(one_gpu, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert local_gpu(3) == 0  # srun --gpus-per-task=1: local id 3 sees one GPU, its own


def test_model_device_cpu_keeps_ranks_off_the_gpu(one_gpu):
    assert uses_cuda("auto") and uses_cuda("cuda:0")
    assert not uses_cuda("cpu")


def test_a_second_rank_on_a_one_gpu_node_is_a_one_line_error(one_gpu, monkeypatch):
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "job"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RecipeError, match="local rank 1 has no GPU"):
        setup_parallel(ParallelConfig(), "auto")  # before any process group or CUDA call


def test_fsdp_shards_cpu_ranks_on_a_cpu_mesh(one_gpu, monkeypatch):
    meshes, shards = [], []
    monkeypatch.setattr(torch.distributed.device_mesh, "init_device_mesh",
                        lambda device_type, shape, **kw: meshes.append((device_type, shape)) or "mesh")
    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard",
                        lambda module, **kw: shards.append(kw.get("mesh")) or module)
    model = tiny_llama()
    env = ParallelEnv(rank=1, world=2, local_rank=1, device=torch.device("cpu"))
    wrap_for_training(model, model, env, fsdp=True, bf16=False)
    assert meshes == [("cpu", (2,))]
    assert shards == ["mesh"] * (model.config.num_hidden_layers + 1)  # every layer, then the root

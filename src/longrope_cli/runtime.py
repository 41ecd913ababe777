"""Where this process runs: its rank among torchrun / srun ranks, its device, and the process group.

Every stage asks here: "am I rank 0" (`is_main_process`, the one process that writes files), which GPU a
rank takes (`local_gpu`), and joins the group through `init_distributed`, the one place that calls
`torch.distributed.init_process_group`.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch

from longrope_cli.errors import ModelError, RecipeError


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, or srun's (SLURM_PROCID, ...) mapped onto them."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_PORT", "29500")
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    """True on rank 0 (or without torch.distributed): the process that writes files."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return distributed_env()[0] == 0


def local_gpu(local_rank: int) -> int:
    """This rank's CUDA device index. torchrun shows every GPU of the node to every rank, so rank k takes GPU k;
    srun --gpus-per-task shows a task only its own GPU(s), so its local rank is taken modulo what it sees."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count and "TORCHELASTIC_RUN_ID" not in os.environ:  # not torchrun: a task bound to its own GPU(s)
        return local_rank % count
    raise RecipeError(f"local rank {local_rank} has no GPU: this node has {count} CUDA device(s); launch at most "
                      f"that many processes per node (torchrun --nproc-per-node {count}), or set model.device=cpu "
                      "for CPU ranks")


def uses_cuda(device: str) -> bool:
    """Whether a recipe's model.device puts this process on a GPU."""
    return torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))


def pick_device(device: str = "auto") -> torch.device:
    """A recipe's model.device as a torch device (auto: CUDA when there is one)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelError(f"device {device!r} is not a torch device; use auto, cpu or cuda[:N]") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return resolved


def rank_device(device: str = "auto") -> str:
    """The device this rank loads its model onto: under several ranks with auto, its own local GPU."""
    rank, world, local_rank = distributed_env()
    if world > 1 and uses_cuda(device) and device in ("auto", "cuda"):
        return f"cuda:{local_gpu(local_rank)}"
    return device


def init_distributed(backend: str = "auto", device: str = "auto") -> tuple[int, int]:
    """Join the process group started by torchrun / srun (idempotent); returns (rank, world size).

    auto = NCCL when the model goes to a GPU (`device`, the recipe's model.device), gloo otherwise. srun needs
    MASTER_ADDR exported by the sbatch script.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world, local_rank = distributed_env()
    if "MASTER_ADDR" not in os.environ:
        if world > 1:
            raise RecipeError("several ranks need a launcher: run under torchrun (or srun with MASTER_ADDR "
                              "exported); see `longrope search --help`")
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ.setdefault("MASTER_PORT", "29500")
    if backend == "auto":
        backend = "nccl" if uses_cuda(device) else "gloo"
    device_id = None
    if backend == "nccl":
        device_id = torch.device("cuda", local_gpu(local_rank))
        torch.cuda.set_device(device_id)  # object collectives on NCCL use the current device
    dist.init_process_group(backend=backend, rank=rank, world_size=world, device_id=device_id)
    # End the group the documented way. (It does not cure the rare exit -6 in torch's C++ teardown;
    # cli/main.py steps around that.)
    atexit.register(destroy_process_group)
    return rank, world


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]

"""torch.distributed for fine-tuning: one process, DDP, FSDP2, and context parallel on GPUs.

The rank layout comes from the environment torchrun (or `srun torchrun`) sets: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Without them the run is one plain process (CPU or one GPU).

    $ torchrun --nproc-per-node 2 -m longrope_cli finetune recipes/tiny.yaml           # 2 CPU ranks, gloo, DDP
    $ torchrun --nproc-per-node 8 -m longrope_cli finetune RECIPE parallel.fsdp=true   # FSDP2 over 8 GPUs
    $ srun torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 \\
          -m longrope_cli finetune RECIPE parallel.fsdp=true parallel.context_parallel=4

Ranks form a (data parallel x context parallel) grid, rank = dp_rank * cp + cp_rank: the `cp` ranks of
one row share one sequence (torch's `context_parallel` shards it and runs ring attention), rows see
different sequences. Gradients are averaged over all ranks, which is the batch mean in both directions.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from longrope_cli.errors import ModelError, RecipeError
from longrope_cli.runtime import distributed_env, init_distributed, local_gpu, pick_device, uses_cuda

log = logging.getLogger(__name__)


@dataclass
class ParallelEnv:
    """Where this process sits: rank, world size, device, and the context-parallel mesh (None when off)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    context_parallel: int = 1
    cp_mesh: Any = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank // self.context_parallel

    @property
    def dp_world(self) -> int:
        return self.world // self.context_parallel

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _reduce(self, value: float, op: Any) -> float:
        if not self.distributed:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return float(tensor.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (e.g. one rank got SIGTERM)."""
        return self._reduce(float(flag), dist.ReduceOp.MAX if self.distributed else None) > 0

    def mean(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.SUM if self.distributed else None) / self.world

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_parallel(parallel: Any, device: str = "auto") -> ParallelEnv:
    """Join the torchrun process group (if any) and pick this rank's device; refuse what cannot run here."""
    rank, world, local_rank = distributed_env()  # torchrun's variables, or srun's mapped onto them
    cp = parallel.context_parallel
    if cp < 1:
        raise RecipeError(f"parallel.context_parallel must be >= 1, got {cp}")
    if cp > 1 and not torch.cuda.is_available():
        raise RecipeError(
            f"parallel.context_parallel={cp} needs CUDA GPUs (torch context_parallel runs ring attention on the "
            "GPU SDPA kernels only); set parallel.context_parallel=1 on CPU")
    if cp > 1 and (world < cp or world % cp):
        raise RecipeError(
            f"parallel.context_parallel={cp} must divide the number of ranks ({world}); launch with torchrun "
            f"--nproc-per-node a multiple of {cp}")
    if world == 1 and not dist.is_initialized():
        return ParallelEnv(device=pick_device(device))
    use_cuda = uses_cuda(device)
    if use_cuda:
        index = local_gpu(local_rank)
        torch.cuda.set_device(index)
        here = torch.device("cuda", index)
    else:
        here = torch.device("cpu")
    owns = not dist.is_initialized()
    rank, world = init_distributed(parallel.dist_backend, device)
    cp_mesh = None
    if cp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cuda", (world // cp, cp), mesh_dim_names=("dp", "cp"))
        cp_mesh = mesh["cp"]
    log.info("rank %d/%d on %s (%s, context parallel %d)", rank, world, here, dist.get_backend(), cp)
    return ParallelEnv(rank=rank, world=world, local_rank=local_rank, device=here, context_parallel=cp,
                       cp_mesh=cp_mesh, owns_group=owns)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (the classes transformers itself never splits: `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ModelError(f"cannot find the decoder layers of {type(model).__name__} to shard; set parallel.fsdp=false")
    return layers


def wrap_for_training(module: nn.Module, model: nn.Module, env: ParallelEnv, *, fsdp: bool, bf16: bool) -> nn.Module:
    """DDP or FSDP2 around `module` (the model plus its loss); the module itself in one process.

    FSDP2 shards each decoder layer and then the root (embeddings, final norm, LM head), so a rank only
    holds 1/world of the weights, gradients and AdamW states; with bf16 it gathers parameters in bf16 and
    reduces gradients in fp32 over fp32 master weights.
    """
    if not env.distributed:
        return module
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else (
            MixedPrecisionPolicy())
        # fully_shard's default mesh is a CUDA one whenever CUDA exists: CPU ranks on a GPU machine would each
        # claim GPU <local rank> (and fail past the first on a 1-GPU box). Shard on the ranks' own device type.
        mesh = init_device_mesh(env.device.type, (env.world,))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def gradient_sync(wrapped: nn.Module, enabled: bool) -> AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if hasattr(wrapped, "no_sync"):  # DDP
        return nullcontext() if enabled else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(enabled)
    return nullcontext()


def sequence_parallel(env: ParallelEnv, buffers: list[torch.Tensor]) -> AbstractContextManager:
    """Shard `buffers` (B, L) along the sequence over the context-parallel ranks, with ring attention inside.

    Forward and backward must both run inside. Off (a no-op) unless parallel.context_parallel > 1.
    """
    if env.cp_mesh is None:
        return nullcontext()
    from torch.distributed.tensor.experimental import context_parallel

    return context_parallel(env.cp_mesh, buffers=buffers, buffer_seq_dims=[1] * len(buffers),
                            no_restore_buffers=set(buffers))

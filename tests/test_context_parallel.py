"""Context-parallel scoring: several gloo ranks score one window together (torch's ring attention) and get the
single-process layer-by-layer loss, on every architecture family, with LongRoPE factors installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import ARCHITECTURES, tiny_architecture
from longrope_cli.context_parallel import ContextGroup, check_length, local_positions
from longrope_cli.errors import RecipeError

LENGTH = 192  # a multiple of 2 x 2 and 2 x 3


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_the_ranks_hold_the_whole_window_in_equal_head_tail_shares(size):
    shares = [local_positions(LENGTH if size != 4 else 256, ContextGroup(None, r, size)) for r in range(size)]
    length = LENGTH if size != 4 else 256
    assert sorted(torch.cat(shares).tolist()) == list(range(length))
    assert {len(s) for s in shares} == {length // size}
    piece = length // (2 * size)
    assert shares[0][:piece].tolist() == list(range(piece))  # rank 0: the first chunk and the last
    assert shares[0][-1].item() == length - 1


def test_a_length_the_layout_cannot_cut_is_a_one_line_recipe_error():
    with pytest.raises(RecipeError, match=r"search.target=100 must be a multiple of 2 x parallel.context_parallel"):
        check_length(100, 3)
    check_length(100, 1)


def _install(model):
    from longrope_cli.rope.factors import FactorSet
    from longrope_cli.rope.layout import layout_from_config
    from longrope_cli.rope.rotary import install_factors

    layout = layout_from_config(model.config)
    lam = tuple(1.0 + 3.0 * i / max(1, layout.pairs - 1) for i in range(layout.pairs))
    install_factors(model, FactorSet(long_factor=lam, short_factor=(1.0,) * layout.pairs, start_tokens=4,
                                     attention=1.2, target_length=256), layout)


def _cases():
    """(architecture, window ids, labels or None): every family, and a needle-style label set."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 96, (1, LENGTH), generator=generator)
    labels = torch.full_like(ids, -100)
    labels[:, 150:160] = ids[:, 151:161]  # only an "answer" late in the window is scored, all on one rank
    return [(kind, ids, None) for kind in ARCHITECTURES] + [("llama-gqa", ids, labels)]


def _score_all(context, device: str = "cpu"):
    from longrope_cli.evaluate.perplexity import window_nll

    torch.set_num_threads(1)
    out = []
    for kind, ids, labels in _cases():
        model = tiny_architecture(kind).eval().to(device)
        _install(model)
        out.append(window_nll(model, ids, chunk=40, labels=labels, scoring="layerwise", context=context))
    return out


def _worker(rank: int, size: int, init: str, result_dir: str, backend: str = "gloo") -> None:
    import torch.distributed as dist

    from longrope_cli.context_parallel import context_group

    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=size)
    try:
        scores = _score_all(context_group(size), device)
        Path(result_dir, f"rank{rank}.json").write_text(json.dumps(scores))
    finally:
        dist.destroy_process_group()


def _run_ranks(size: int, tmp_path: Path, backend: str, device: str):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    mp.start_processes(_worker, args=(size, init, str(tmp_path), backend), nprocs=size, start_method="spawn")
    threads = torch.get_num_threads()
    try:
        expected = _score_all(None, device)
    finally:
        torch.set_num_threads(threads)
    return expected


@pytest.mark.parametrize("size", [2, 3])
def test_gloo_ranks_score_one_window_together_as_one_process_does(size, tmp_path):
    expected = _run_ranks(size, tmp_path, "gloo", "cpu")
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(size)]
    assert all(scores == per_rank[0] for scores in per_rank)  # one all-reduced number per window on every rank
    for (kind, _, labels), (nll, count), (want_nll, want_count) in zip(_cases(), per_rank[0], expected, strict=True):
        assert count == want_count == (10 if labels is not None else LENGTH - 1), kind
        assert nll == pytest.approx(want_nll, rel=2e-6), kind


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_score_one_window_together_as_one_gpu_does(tmp_path):
    """NCCL and the CUDA flash / memory-efficient kernels (fp32 here: the efficient one)."""
    expected = _run_ranks(2, tmp_path, "nccl", "cuda:0")
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for (kind, _, _), (nll, count), (want_nll, want_count) in zip(_cases(), per_rank[0], expected, strict=True):
        assert count == want_count, kind
        assert nll == pytest.approx(want_nll, rel=1e-4), kind

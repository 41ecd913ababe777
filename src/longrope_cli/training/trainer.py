"""The fine-tuning loop behind `longrope finetune` (stages/finetune.py), built as torchtune builds a recipe:
`setup()` calls `_setup_model`, `_setup_data` and `_setup_optimizer`; `train()` runs the steps; `finish()`
saves.

Everything that grows with the length is bounded: activation checkpointing per decoder layer, the loss in
checkpointed chunks (never an L x vocab logits tensor), sdpa attention. Our rotary module holds no
parameters, so the factors stay installed. Checkpoints (training/checkpoint.py) go to OUT/checkpoint every
`finetune.save_every` steps and on SIGTERM / SIGUSR1, and a resume continues with the same batches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longrope_cli.data import load_corpus, tokenize_documents
from longrope_cli.errors import LongRopeError, RecipeError
from longrope_cli.lengths import format_length
from longrope_cli.losses import chunked_nll, decoder_of, shift_labels
from longrope_cli.models import LoadedModel, load_recipe_model
from longrope_cli.numbers import digest
from longrope_cli.outputs import atomic_write_text
from longrope_cli.recipe import Recipe
from longrope_cli.rope.factors import FactorSet, load_factors
from longrope_cli.rope.rotary import install_factors
from longrope_cli.seqchunk import chunk_mlps
from longrope_cli.training import checkpoint as ckpt
from longrope_cli.training.data import WindowIndex, WindowOrder
from longrope_cli.training.distributed import (
    ParallelEnv,
    gradient_sync,
    sequence_parallel,
    wrap_for_training,
)

log = logging.getLogger(__name__)

MLP_CHUNK_FROM = 32 * 1024  # finetune.mlp_chunk null: chunk the MLPs from this training length on
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class Preempted(LongRopeError):
    """Stopped by a signal after saving a checkpoint; rerun with --resume."""

    exit_code = 143  # 128 + SIGTERM, what a scheduler expects from a job that honoured its signal


class ChunkedCausalLM(nn.Module):
    """The model and its chunked loss as one module, so DDP / FSDP see the whole forward (the LM head
    weight that the loss uses directly is gathered like every other root parameter)."""

    def __init__(self, model: nn.Module, chunk: int, mlp_chunk: int = 0) -> None:
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.mlp_chunk = mlp_chunk  # > 0: the MLPs run (and are recomputed) that many positions at a time
        chunk_mlps(model, mlp_chunk, recompute=True)  # for the training run: backward's recomputation needs it

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # A context-parallel shard holds two chunks of the sequence (load balancing), so its position ids
        # jump; with no mask transformers would read that as packed sequences and mask across the jump.
        # An all-ones mask keeps plain causal attention (sdpa still runs is_causal, no mask tensor).
        mask = torch.ones_like(input_ids) if position_ids is not None else None
        hidden = decoder_of(self.model)(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                        use_cache=False)
        return chunked_nll(self.model, hidden.last_hidden_state, labels, chunk=self.chunk, recompute=True)


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)  # linear decay to 0


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict[str, Any]]:
    """Turn SIGTERM / SIGUSR1 into a flag checked after every step (the step in flight is finished)."""
    flag: dict[str, Any] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        flag["signal"] = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def enable_checkpointing(model: Any, offload: bool = False) -> None:
    """Keep one hidden state per decoder layer (L x hidden) instead of all its activations; backward
    recomputes the rest. `offload` parks those states in pinned CPU memory as well."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.24
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs, offload=offload)
    elif offload:
        raise RecipeError("finetune.activation_offload needs transformers >= 5.24; set it to false")
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _digest(factors: FactorSet) -> str:
    return digest([factors.long_factor, factors.short_factor, factors.start_tokens, factors.attention], 12)


class Finetune:
    """One fine-tuning run: `setup()` builds everything, `train()` runs the steps, `finish()` saves."""

    def __init__(self, recipe: Recipe, out: Path, env: ParallelEnv, lm: LoadedModel | None, progress: bool) -> None:
        self.recipe, self.cfg, self.out, self.env, self.lm, self.progress = (
            recipe, recipe.finetune, out, env, lm, progress)
        self.last_loss = math.nan

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        if not self.cfg.factors:
            raise RecipeError("finetune.factors is not set; pass --factors runs/search-2k/factors.json "
                              "(the output of `longrope search`)")
        self._check_batch()
        self._setup_model()
        self._setup_data()
        self._setup_optimizer()

    def _check_batch(self) -> None:
        cfg, env = self.cfg, self.env
        per_step = env.dp_world * cfg.micro_batch_size
        if cfg.batch_size % per_step:
            raise RecipeError(
                f"finetune.batch_size={cfg.batch_size} must be a multiple of micro_batch_size x data-parallel "
                f"ranks = {cfg.micro_batch_size} x {env.dp_world}")

    def _setup_model(self) -> None:
        """Load the model (fp32 master weights unless the recipe pins a dtype) and install the factors."""
        cfg, env, recipe = self.cfg, self.env, self.recipe
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")
        if self.lm is None:
            # bf16 runs as autocast / FSDP mixed precision over fp32 weights.
            dtype = recipe.model.dtype if recipe.model.dtype != "auto" else "float32"
            self.lm = load_recipe_model(recipe.model, device=str(env.device), dtype=dtype)
        lm = self.lm
        self.factors = load_factors(cfg.factors, lm.layout)
        self.target = cfg.target or self.factors.target_length
        if not self.target:
            raise RecipeError(f"{cfg.factors} names no target length; pass --target (e.g. --target 2k)")
        if self.target < lm.layout.original_length:  # at the window itself is allowed: a warm-up with the factors
            raise RecipeError(f"finetune.target={format_length(self.target)} is below the model's original window "
                              f"{format_length(lm.layout.original_length)}; pass a longer --target")
        if env.context_parallel > 1 and self.target % (2 * env.context_parallel):
            raise RecipeError(f"finetune.target={self.target} must be a multiple of 2 x parallel.context_parallel "
                              f"(load-balanced ring attention)")
        self.export_target = max(self.factors.target_length or self.target, self.target)
        self.save_dtype = ckpt.source_dtype(lm.path, lm.model)
        trained = self.factors
        if cfg.short_batch_size:
            self._check_short_batch()
            # Inputs within the original window run on the short factors (as in transformers' longrope), but
            # with the one attention factor it applies at every length: train them that way.
            short = self.factors.short_factor or (1.0,) * lm.layout.pairs
            trained = replace(self.factors, short_factor=tuple(short))
        install_factors(lm.model, trained, lm.layout)
        self.trained = trained  # what the saved model must run (its config carries these short factors)

    def _setup_data(self) -> None:
        """The training windows (and the short ones) and their seeded order."""
        cfg, lm, data = self.cfg, self.lm, self.recipe.data
        corpus = load_corpus(data.corpus, data.text_field, data.search_fraction, data.eval_fraction)
        docs = tokenize_documents(corpus.split("train"), lm.tokenizer, data.cache_dir)
        bos = lm.tokenizer.bos_token_id
        self.windows = WindowIndex(docs, self.target, bos, data.windows_per_doc, limit=cfg.steps * cfg.batch_size)
        self.order = WindowOrder(len(self.windows), cfg.batch_size, cfg.seed)
        self.short_windows: WindowIndex | None = None
        if cfg.short_batch_size:
            self.short_windows = WindowIndex(docs, lm.layout.original_length, bos, data.windows_per_doc,
                                             limit=cfg.steps * cfg.short_batch_size)
            self.short_order = WindowOrder(len(self.short_windows), cfg.short_batch_size, cfg.seed + 1)
        passes = cfg.steps * cfg.batch_size / len(self.windows)
        log.info("fine-tuning %s at %s: %d steps x %d sequences over %d windows (%.1f passes)%s", lm.name,
                 format_length(self.target), cfg.steps, cfg.batch_size, len(self.windows), passes,
                 f", + {cfg.short_batch_size} of {format_length(lm.layout.original_length)} with the short factors"
                 if cfg.short_batch_size else "")

    def _setup_optimizer(self) -> None:
        """Checkpointing, the DDP / FSDP wrap, AdamW and the schedule."""
        cfg, env, recipe = self.cfg, self.env, self.recipe
        model = self.lm.model
        model.train()
        model.config.use_cache = False
        if cfg.activation_checkpointing or cfg.activation_offload:
            enable_checkpointing(model, offload=cfg.activation_offload)
        torch.manual_seed(cfg.seed)
        mlp_chunk = cfg.mlp_chunk if cfg.mlp_chunk is not None else (
            recipe.model.loss_chunk if self.target >= MLP_CHUNK_FROM else 0)
        self.module = wrap_for_training(ChunkedCausalLM(model, recipe.model.loss_chunk, mlp_chunk), model, env,
                                        fsdp=recipe.parallel.fsdp, bf16=self.bf16)
        self.autocast = self.bf16 and not (env.distributed and recipe.parallel.fsdp)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps, cfg.schedule))

    def _check_short_batch(self) -> None:
        cfg, env = self.cfg, self.env
        if cfg.short_batch_size % env.dp_world:
            raise RecipeError(f"finetune.short_batch_size={cfg.short_batch_size} must be a multiple of the "
                              f"{env.dp_world} data-parallel ranks")
        if env.context_parallel > 1:
            raise RecipeError("finetune.short_batch_size needs parallel.context_parallel=1 (short windows are not "
                              "sharded); set it to 0")
        if self.target <= self.lm.layout.original_length:
            raise RecipeError(f"finetune.short_batch_size: the target {format_length(self.target)} is not beyond the "
                              f"original window {format_length(self.lm.layout.original_length)}; set it to 0")

    # What a checkpoint must agree on to be resumed: another batch, schedule or learning rate would silently change
    # the run while recipe.yaml records the new values. Recipe key -> this run's value.
    def settings(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"finetune.target": self.target, "finetune.batch_size": cfg.batch_size, "finetune.seed": cfg.seed,
                "finetune.factors": _digest(self.factors), "model.name": self.recipe.model.name,
                "finetune.short_batch_size": cfg.short_batch_size, "finetune.steps": cfg.steps,
                "finetune.lr": cfg.lr, "finetune.schedule": cfg.schedule, "finetune.warmup_steps": cfg.warmup_steps,
                "finetune.weight_decay": cfg.weight_decay, "finetune.grad_clip": cfg.grad_clip}

    def restore(self, resume: bool) -> int:
        found = ckpt.find_checkpoint(self.out)
        if not resume or found is None:
            if resume:
                log.info("no checkpoint in %s: starting at step 0", self.out)
            return 0
        saved = ckpt.read_trainer_state(found).get("settings", {})
        for key, value in self.settings().items():
            old = saved.get(key, saved.get(key.split(".")[-1], value))  # older checkpoints: short keys
            if old != value:
                raise RecipeError(
                    f"{found} was made with {key}={old!r}, this run has {key}={value!r}; resume with the same "
                    f"recipe, or start afresh in another --out")
        state = ckpt.load_checkpoint(found, self.module, self.optimizer, self.scheduler, self.env)
        self.last_loss = state.get("loss", math.nan)
        log.info("resumed from %s at step %d/%d", found, state["step"], self.cfg.steps)
        return int(state["step"])

    # ------------------------------------------------------------------ training

    def _micro_step(self, ids: torch.Tensor, scale: float, sync: bool) -> float:
        """Forward + backward of one micro-batch; returns its mean loss."""
        labels = shift_labels(ids)
        buffers = [ids, labels]
        if self.env.cp_mesh is not None:  # every rank needs its shard's global positions
            buffers.append(torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous())
        device_type = self.env.device.type
        with gradient_sync(self.module, sync), sequence_parallel(self.env, buffers), \
                torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.autocast):
            nll, count = self.module(*buffers)
            loss = nll / count.clamp(min=1)
            (loss * scale).backward()
        return float(loss.detach())

    def step(self, step: int) -> tuple[float, float]:
        """One optimizer step over the global batch; returns (mean loss over ranks, gradient norm).

        Short windows (finetune.short_batch_size) form one more micro-batch per rank; every sequence, long or
        short, weighs the same in the step's loss."""
        cfg = self.cfg
        mine = self.order.shard(step, self.env.dp_rank, self.env.dp_world)
        batches = [self.windows.batch(mine[i:i + cfg.micro_batch_size])
                   for i in range(0, len(mine), cfg.micro_batch_size)]
        if self.short_windows is not None:
            batches.append(self.short_windows.batch(self.short_order.shard(step, self.env.dp_rank,
                                                                           self.env.dp_world)))
        sequences = sum(ids.shape[0] for ids in batches)
        loss = 0.0
        for k, ids in enumerate(batches):
            weight = ids.shape[0] / sequences
            loss += weight * self._micro_step(ids.to(self.env.device), weight, sync=k == len(batches) - 1)
        norm = math.nan
        if cfg.grad_clip > 0:
            total = torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.grad_clip)
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.env.mean(loss), norm

    def save(self, step: int) -> None:
        ckpt.save_checkpoint(self.out, self.module, self.optimizer, self.scheduler, self.env,
                             {"step": step, "loss": self.last_loss, "settings": self.settings()})
        if self.env.is_main:
            log.info("checkpoint at step %d: %s", step, self.out / ckpt.CHECKPOINT)

    def _metrics_file(self, start: int) -> Path:
        """metrics.jsonl without the lines of steps after `start` (they are redone after a resume)."""
        path = self.out / "metrics.jsonl"
        if self.env.is_main:
            lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() and start else []
            kept = []
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:  # a line a kill tore in half: that step is redone
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= start:
                    kept.append(line)
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        return path

    def train(self, start: int) -> None:
        from tqdm.auto import tqdm

        cfg, env = self.cfg, self.env
        metrics = self._metrics_file(start)
        tokens = cfg.batch_size * self.target + cfg.short_batch_size * self.lm.layout.original_length
        bar = tqdm(total=cfg.steps, initial=start, desc=f"finetune {format_length(self.target)}", unit="step",
                   disable=not (self.progress and env.is_main))
        began = time.perf_counter()
        try:
            with stop_on_signals() as stop, (metrics.open("a", encoding="utf-8") if env.is_main
                                             else contextlib.nullcontext()) as log_file:
                for step in range(start, cfg.steps):
                    lr = self.scheduler.get_last_lr()[0]
                    tick = time.perf_counter()
                    self.last_loss, norm = self.step(step)
                    seconds = time.perf_counter() - tick
                    done = step + 1
                    if env.is_main:
                        record = {"step": done, "loss": round(self.last_loss, 6), "lr": lr,
                                  "grad_norm": None if math.isnan(norm) else round(norm, 6),
                                  "tokens_per_s": round(tokens / seconds, 1), "step_s": round(seconds, 4),
                                  "elapsed_s": round(time.perf_counter() - began, 2)}
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                        bar.set_postfix(loss=f"{self.last_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:,.0f}")
                        bar.update(1)
                    if not math.isfinite(self.last_loss):
                        raise LongRopeError(f"loss became {self.last_loss} at step {done}; lower finetune.lr "
                                            "or check the factors")
                    if env.any(stop["signal"] is not None):
                        self.save(done)
                        raise Preempted(f"stopped by {stop['signal'] or 'a signal on another rank'} after step "
                                        f"{done}/{cfg.steps}; checkpoint saved in {self.out / ckpt.CHECKPOINT}; "
                                        "rerun with --resume to continue")
                    if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                        self.save(done)
        finally:
            bar.close()

    # ------------------------------------------------------------------ output

    def finish(self, complete: Callable[..., Any]) -> Any:
        """Save the model and factors (rank 0), then `complete(artifact, **summary)`: the stage folder's record,
        written before the checkpoint goes. Returns what `complete` returned, on every rank."""
        cfg, env, lm = self.cfg, self.env, self.lm
        state = ckpt.full_model_state(self.module)  # collective under FSDP
        model_dir = self.out / "model"
        if env.is_main:
            factors = self.factors.with_provenance(
                stage="finetune", train_length=self.target, steps=cfg.steps, batch_size=cfg.batch_size,
                final_loss=self.last_loss, base_model=self.recipe.model.name)
            # The model folder runs what was trained (short windows: its short factors); the file handed on to
            # later stages is the one given.
            trained = replace(factors, short_factor=self.trained.short_factor)
            ckpt.save_hf_model(lm.model, lm.tokenizer, state, trained, lm.layout, self.export_target, model_dir,
                               self.save_dtype)
            factors.save(self.out / "factors.json", lm.layout)
        result = complete(model_dir, steps=cfg.steps, final_loss=self.last_loss, train_length=self.target)
        if env.is_main:
            if not cfg.keep_checkpoint:  # after the marker: a kill in between must not lose the finished run
                for name in (ckpt.CHECKPOINT, ckpt.CHECKPOINT + ".old"):
                    shutil.rmtree(self.out / name, ignore_errors=True)
            log.info("fine-tuned model: %s (final loss %.4f)", model_dir, self.last_loss)
        env.barrier()
        return result



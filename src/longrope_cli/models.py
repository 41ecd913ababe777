"""Load a causal LM and its tokenizer (local directory, GGUF file, or the bundled test bed)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from longrope_cli.errors import ModelError
from longrope_cli.rope.layout import RopeLayout, layout_from_config
from longrope_cli.runtime import pick_device, rank_device

if TYPE_CHECKING:
    from longrope_cli.recipe import ModelConfig
    from longrope_cli.rope.factors import FactorSet

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
TESTBED_NAME = "testbed"


def testbed_path() -> Path:
    """The bundled CPU test-bed model directory."""
    return ASSETS / "testbed"


@dataclass
class LoadedModel:
    """A model ready for longrope: the transformers model, its tokenizer and its rotary layout."""

    model: Any
    tokenizer: Any
    layout: RopeLayout
    name: str
    path: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def native(self) -> FactorSet | None:
        """The model's own RoPE as an absolute FactorSet if its config pre-scales it (llama3, yarn, longrope,
        linear), else None; see `rope.native.native_factors`."""
        from longrope_cli.rope.native import native_factors

        return native_factors(self.model, self.layout)


def resolve_model(name: str) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a model name: 'testbed', a local HF directory or a .gguf file."""
    if name == TESTBED_NAME:
        path = testbed_path()
        if not (path / "config.json").is_file():
            raise ModelError("the bundled test-bed model is missing; reinstall longrope or run scripts/train_testbed.py")
        return path, None
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
        raise ModelError(f"model directory {name!r} has no config.json; give a Hugging Face model directory")
    if path.is_file():
        raise ModelError(f"model {name!r} is a file, not a model: give a Hugging Face model directory (with "
                         "config.json), a .gguf file, or 'testbed'")
    raise ModelError(
        f"model {name!r} not found; give a local Hugging Face directory, a .gguf file, or 'testbed' "
        "(models are never downloaded at run time)")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(
    name: str = TESTBED_NAME,
    *,
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str = "sdpa",
    original_length: int | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load model + tokenizer with no hub access. `name`: 'testbed', a local directory, or a .gguf file.

    Example:
        >>> lm = load_model("testbed")
        >>> lm.layout.original_length
        256
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: everything is local
    # transformers' own "Loading weights" bars would land in log files and --no-progress output; one line instead.
    hf_logging.disable_progress_bar()
    path, gguf = resolve_model(name)
    target_device = pick_device(device)
    log.info("loading model %s on %s", name, target_device)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=pick_dtype(dtype, target_device), attn_implementation=attn_implementation, **kwargs)
    except (OSError, ValueError, ImportError, KeyError, RuntimeError, SafetensorError) as err:
        # a corrupt or foreign checkpoint is the user's to fix: one line, not a traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load model {name!r}: {first}") from None
    if gguf:
        # transformers dequantises GGUF weights to plain tensors but still flags the model as "quantized",
        # which would make save_pretrained (and so `longrope export` / finetune) refuse it.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.to(target_device)
    model.eval()
    layout = layout_from_config(model.config, name=name, original_length=original_length)
    if layout.prescaled:
        from longrope_cli.rope.native import describe_native

        log.info("%s", describe_native(layout))
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, layout=layout, name=name, path=path)


def load_recipe_model(cfg: ModelConfig, *, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """The recipe's `model:` section loaded: the one loader every stage uses. Under several ranks with device
    auto each rank takes its own local GPU; `device` / `dtype` override the section (the fine-tune keeps fp32
    master weights, export works on the CPU)."""
    return load_model(cfg.name, dtype=dtype or cfg.dtype, device=device or rank_device(cfg.device),
                      attn_implementation=cfg.attn_implementation, original_length=cfg.original_length,
                      trust_remote_code=cfg.trust_remote_code)

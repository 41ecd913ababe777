"""Output folders: atomic writes, and the provenance every stage leaves beside its artifact."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` so that readers see either the old file or the complete new one, never a torn write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def strict_json(data: Any) -> Any:
    """`data` with every non-finite float written as the string "inf", "-inf" or "nan": JSON has no such numbers
    and most readers reject Python's `Infinity` / `NaN`."""
    if isinstance(data, float) and not math.isfinite(data):
        return "nan" if math.isnan(data) else ("inf" if data > 0 else "-inf")
    if isinstance(data, dict):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [strict_json(value) for value in data]
    return data


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Strict JSON (no Infinity / NaN), written atomically."""
    atomic_write_text(path, json.dumps(strict_json(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def git_revision() -> str:
    """The git revision of the longrope source tree, or 'unknown' for an installed wheel."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment_info() -> dict[str, Any]:
    """Package versions, git revision and host facts, for reproducing a run."""
    from importlib import metadata

    from longrope_cli import __version__

    versions = {"longrope-cli": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "numpy", "tokenizers", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    info: dict[str, Any] = {
        "versions": versions,
        "git_revision": git_revision(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return info


def prepare_run_dir(out: str | Path, stage: str, recipe_dict: dict[str, Any]) -> Path:
    """Create the stage's output folder and write `recipe.yaml` (resolved) and `env.json` into it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.yaml", f"# resolved recipe of `longrope {stage}`\n" + yaml.safe_dump(recipe_dict, sort_keys=False))
    atomic_write_json(out / "env.json", {"stage": stage, **environment_info()})
    return out


COMPLETE_MARKER = "complete.json"


def mark_complete(out: str | Path, stage: str, artifact: str | Path, **summary: Any) -> None:
    """Record, last and atomically, that a stage finished: `longrope run` skips stages that have this file."""
    atomic_write_json(Path(out) / COMPLETE_MARKER, {
        "stage": stage,
        "artifact": str(Path(artifact).relative_to(out)) if Path(artifact).is_relative_to(out) else str(artifact),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **summary,
    })


def is_complete(out: str | Path) -> bool:
    return (Path(out) / COMPLETE_MARKER).is_file()

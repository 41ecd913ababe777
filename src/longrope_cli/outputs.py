"""Output folders: atomic writes, and the provenance every stage leaves beside its artifact."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from longrope_cli.numbers import json_number


def _create_temp(directory: Path, name: str) -> tuple[int, Path]:
    """A new, empty, uniquely named temporary file beside the target, opened for writing.

    Unlike `tempfile.mkstemp` (always 0600), the file is created with mode 0666 and the kernel applies the
    process umask (and any default ACL of the folder), exactly as a plain `open(path, "w")` would; the umask is
    never read or changed, so nothing races with other threads."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = directory / f".{name}.{os.urandom(6).hex()}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {name!r} in {str(directory)!r}")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` so that readers see either the old file or the complete new one, never a torn write.

    The new file gets the permissions a plain `open(path, "w")` gives a new file (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def strict_json(data: Any) -> Any:
    """`data` with every non-finite float written as the string "inf", "-inf" or "nan": JSON has no such numbers
    and most readers reject Python's `Infinity` / `NaN`."""
    if isinstance(data, float):
        return json_number(data)
    if isinstance(data, dict):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [strict_json(value) for value in data]
    return data


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Strict JSON (no Infinity / NaN), written atomically."""
    atomic_write_text(path, json.dumps(strict_json(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


_PACKAGE_DIR = Path(__file__).resolve().parent
# Where the package sits in this project's own source checkout (an editable install runs from there too).
_CHECKOUT_PACKAGE = Path("src") / "longrope_cli"


def git_revision(package_dir: str | Path | None = None) -> str:
    """The git revision of the longrope source checkout this package runs from, or 'unknown'.

    Only a package directory that is exactly `<git toplevel>/src/longrope_cli`, tracked there, counts: an
    installed wheel (site-packages of a venv that happens to live inside some other git repository, or any copy
    of the package elsewhere in a checkout) reports 'unknown', not the revision of the repository around it."""
    here = Path(package_dir).resolve() if package_dir is not None else _PACKAGE_DIR
    # GIT_DIR / GIT_WORK_TREE (set inside git hooks, say) would point git at another repository.
    env = {key: value for key, value in os.environ.items() if key not in ("GIT_DIR", "GIT_WORK_TREE")}

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=5,
                              check=False, env=env)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or not top.stdout.strip():
            return "unknown"
        toplevel = Path(top.stdout.strip()).resolve()
        if here != toplevel / _CHECKOUT_PACKAGE:
            return "unknown"
        tracked = git("ls-files", "--error-unmatch", "--", "__init__.py")
        out = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if tracked.returncode != 0 or out.returncode != 0:
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

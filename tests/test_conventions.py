"""Packaging and conventions: artifacts follow the umask, the git revision is this checkout's own, `make help`
lists every target, launch.sh never evaluates a path, and `recipe fields` has plain and JSON output."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import longrope_cli
from longrope_cli.cli.main import cli
from longrope_cli.outputs import atomic_write_json, atomic_write_text, git_revision
from longrope_cli.recipe import field_docs

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(longrope_cli.__file__).resolve().parent
HAS_GIT = shutil.which("git") is not None


# ---------------------------------------------------------------- atomic writes follow the umask


@pytest.fixture
def umask():
    """Set the process umask for one test; the old one comes back afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o027])
def test_atomic_write_gets_the_mode_a_plain_open_gives(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as handle:
        handle.write("x")
    expected = 0o666 & ~mask
    if stat.S_IMODE(plain.stat().st_mode) != expected:
        pytest.skip("a default ACL on the temporary folder overrides the umask")
    atomic_write_text(tmp_path / "new.txt", "hello\n")
    atomic_write_json(tmp_path / "sub" / "new.json", {"a": 1})
    for path in (tmp_path / "new.txt", tmp_path / "sub" / "new.json"):
        assert stat.S_IMODE(path.stat().st_mode) == expected, oct(path.stat().st_mode)
    # replacing an existing file: the new file has the umask mode too, whatever the old one had
    old = tmp_path / "old.txt"
    old.write_text("old")
    old.chmod(0o600)
    atomic_write_text(old, "new")
    assert old.read_text() == "new" and stat.S_IMODE(old.stat().st_mode) == expected
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary file left behind


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    target.write_text("old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        atomic_write_json(target, {"a": 1})
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# ---------------------------------------------------------------- git revision of this checkout only


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false",
                    "-C", str(cwd), *args], check=True, capture_output=True, timeout=60)


def copy_package(dest: Path) -> Path:
    shutil.copytree(PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.mark.skipif(not HAS_GIT, reason="no git")
def test_a_package_inside_some_other_repository_reports_unknown(tmp_path):
    repo = tmp_path / "other-project"
    repo.mkdir()
    git(repo, "init", "-q")
    site = copy_package(repo / ".venv" / "lib" / "python3.11" / "site-packages" / "longrope_cli")
    nested = copy_package(repo / "vendor" / "src" / "longrope_cli")  # src/longrope_cli, but not at the top
    (repo / "README").write_text("another project\n")
    git(repo, "add", "-A", "-f")
    git(repo, "commit", "-q", "-m", "init")
    assert git_revision(site) == "unknown"
    assert git_revision(nested) == "unknown"
    # the layout of this project's checkout, but the package is not tracked there: not a checkout of it
    untracked = copy_package(repo / "src" / "longrope_cli")
    assert git_revision(untracked) == "unknown"
    # tracked at <toplevel>/src/longrope_cli: a source checkout of longrope, whose revision is reported
    git(repo, "add", "-A", "-f")
    git(repo, "commit", "-q", "-m", "src")
    assert re.fullmatch(r"[0-9a-f]{12}", git_revision(untracked))


def test_no_git_repository_reports_unknown(tmp_path):
    assert git_revision(copy_package(tmp_path / "site-packages" / "longrope_cli")) == "unknown"


@pytest.mark.skipif(not HAS_GIT, reason="no git")
def test_the_source_checkout_reports_its_revision():
    top = subprocess.run(["git", "-C", str(PACKAGE), "rev-parse", "--show-toplevel"], capture_output=True,
                         text=True, timeout=30, check=False)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() / "src" / "longrope_cli" != PACKAGE:
        pytest.skip("longrope_cli is not imported from a git checkout of this project")
    assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?", git_revision())


# ---------------------------------------------------------------- make help lists every target


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    targets = set()
    for line in text.splitlines():
        if line.startswith(".PHONY:"):
            targets.update(line.split(":", 1)[1].split())
        elif match := re.match(r"^([A-Za-z0-9_%][A-Za-z0-9_.%-]*)\s*:(?![=:])", line):
            targets.add(match.group(1))
    return targets


def test_makefile_targets_are_parsed():
    assert makefile_targets() >= {"install", "test", "test-unit", "test-integration", "demo", "lint", "bench",
                                  "gpu-check", "clean", "help", "recipe-%", "recipe-llama2-2m"}


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_help_lists_every_target():
    done = subprocess.run(["make", "-s", "help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    listed = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("make ")}
    missing = {t for t in makefile_targets() if t.replace("%", "<name>") not in listed}
    assert not missing, f"make help does not list {sorted(missing)}:\n{done.stdout}"


# ---------------------------------------------------------------- launch.sh never evaluates a path


EVIL = [
    "/tmp/x y/$(touch PWNED)",
    "/tmp/b`touch PWNED2`;touch PWNED3; echo 'q $(touch PWNED4)",
    "/tmp/*",
]


def fake_longrope(tmp_path: Path) -> Path:
    """A LONGROPE that prints a dry-run plan: quoted by shlex.join, as `longrope run --dry-run` does, and in
    other quoting a shell would expand (double quotes run $(...) and backticks; a bare * globs)."""
    plan = "\n".join([
        "# evil.yaml: 3 stages in /tmp/runs",
        "# [1/3] search: search -> /tmp/runs/search (to run)",
        shlex.join(["longrope", "search", "evil.yaml", "--out", EVIL[0]]),
        "# [2/3] eval: eval -> x (to run)",
        f'longrope eval evil.yaml "model.name={EVIL[1]}" --out {EVIL[2]}',
        "# [3/3] done: finetune -> y (complete: skipped)",
        "# " + shlex.join(["longrope", "finetune", "evil.yaml", "--out", "$(touch PWNED5)"]),
    ]) + "\n"
    (tmp_path / "plan.txt").write_text(plan)
    script = tmp_path / "fake-longrope"
    script.write_text(f"#!/bin/sh\ncat {shlex.quote(str(tmp_path / 'plan.txt'))}\n")
    script.chmod(0o755)
    return script


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("python3") is None, reason="no bash / python3")
@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "submit"])
def test_launch_passes_paths_literally_and_never_runs_them(tmp_path, dry):
    work = tmp_path / "work"
    work.mkdir()
    longrope = fake_longrope(tmp_path)
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "slurm" / "launch.sh"), *(["--dry-run"] if dry else []), "evil.yaml"],
        capture_output=True, text=True, cwd=work, timeout=120,
        env={**os.environ, "LONGROPE": str(longrope), "SBATCH": "echo"})
    assert done.returncode == 0, done.stderr
    assert not list(work.iterdir()) and not list(tmp_path.glob("PWNED*")), "a path was executed"
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2  # the complete (commented-out) stage is not submitted
    if dry:  # the printed sbatch commands, split back, carry each path as one literal word
        first, second = (shlex.split(line) for line in lines)
        assert first[0] == "echo" and first[-2:] == ["--out", EVIL[0]]
        assert second[-3:] == [f"model.name={EVIL[1]}", "--out", EVIL[2]]
        assert "--dependency=afterok:$JOB_1" in second
    else:  # SBATCH=echo: the job id is what echo printed, i.e. the very words sbatch was given
        assert lines[0].startswith("submitted search as job ") and lines[0].endswith(f"--out {EVIL[0]}")
        assert f"model.name={EVIL[1]} --out {EVIL[2]}" in lines[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("python3") is None, reason="no bash / python3")
def test_launch_rejects_a_command_it_cannot_split(tmp_path):
    (tmp_path / "plan.txt").write_text("longrope search 'unbalanced\n")
    script = tmp_path / "fake-longrope"
    script.write_text(f"#!/bin/sh\ncat {shlex.quote(str(tmp_path / 'plan.txt'))}\n")
    script.chmod(0o755)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "launch.sh"), "--dry-run", "x.yaml"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "LONGROPE": str(script), "SBATCH": "echo"})
    assert done.returncode == 2 and "cannot parse" in done.stderr and not done.stdout


# ---------------------------------------------------------------- recipe fields: table, plain, json


def fields(*args: str):
    result = CliRunner().invoke(cli, ["recipe", "fields", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_recipe_fields_plain():
    rows = field_docs()
    lines = fields("--format", "plain").splitlines()
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows, strict=True):
        cells = line.split("\t")
        assert len(cells) == 4 and cells[0] == row[0] and cells[1] == row[1] and cells[2] == row[2]
    assert not any(ch in "".join(lines) for ch in "\x1b│┃━─")  # no rich markup or box drawing
    assert any(line.startswith("search.population\t") for line in lines)


def test_recipe_fields_json():
    data = json.loads(fields("--format", "json"))
    assert isinstance(data, list) and len(data) == len(field_docs())
    assert all(set(item) == {"key", "type", "default", "help"} for item in data)
    by_key = {item["key"]: item for item in data}
    assert by_key["model.name"]["default"] == "testbed" and by_key["model.name"]["help"]
    assert by_key["search.population"]["default"] is None
    assert by_key["eval.methods"]["default"] == ["none", "pi", "ntk", "dynamic-ntk", "yarn"]
    assert by_key["eval.passkey_depths"]["default"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert by_key["search.start_token_choices"]["default"][:3] == [0, 1, 2]


def test_recipe_fields_table_is_still_the_default():
    out = fields()
    assert "search.population" in out and out == fields("--format", "table")
    assert CliRunner().invoke(cli, ["recipe", "fields", "--format", "yaml"]).exit_code == 2

"""The README runs as written and names only what exists (so it can never rot).

- the Python example and the Quick start shell block run as written (integration);
- every `longrope` command, sub-command, --flag and key=value in its shell blocks exists, and the command table lists exactly
  the commands of `longrope --help`;
- every recipe key it mentions exists in the recipe schema, the search key table covers every search key, and the
  `eval:` key list is the eval section;
- every `make` target it names exists, `make test` runs every test (pytest -m ""), and CI runs `make test`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import longrope_calls, longrope_usage_problems, requires_testbed
from longrope_cli.cli.main import cli
from longrope_cli.recipe import field_docs

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTIONS = ("model", "data", "search", "finetune", "readjust", "eval", "parallel", "output")
FILE_SUFFIXES = {"py", "sbatch", "gguf", "yaml", "json", "jsonl", "txt", "sh", "png", "md", "csv"}


def readme() -> str:
    return README.read_text(encoding="utf-8")


def section(title: str) -> str:
    """The README text under the `## title` heading, up to the next `## ` heading."""
    text = readme()
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README lost its {title!r} section"
    return match.group(1)


def code_blocks(text: str, languages: tuple[str, ...] = ("bash", "console")) -> list[str]:
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if m.group(1) in languages]


def shell_commands(block: str) -> list[list[str]]:
    """The commands of a shell block: `$ ` prompts dropped, backslash continuations joined, comments removed."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        line = line[2:] if line.startswith("$ ") else line
        if line and not line.startswith("#"):
            commands.append(shlex.split(line, comments=True))
    return commands


def readme_example() -> str:
    match = re.search(r"<!-- api-example:[^>]*-->\s*```python\n(.*?)```", readme(), re.S)
    assert match, "README lost its api-example block"
    return match.group(1)


def schema_keys() -> set[str]:
    return {row[0] for row in field_docs()}


# ---------------------------------------------------------------- commands and flags


def cli_commands() -> list[str]:
    """The commands `longrope --help` lists (what a user sees), in order."""
    out = CliRunner().invoke(cli, ["--help"]).output
    listing = out.split("Commands:\n", 1)[1]
    names = []
    for line in listing.splitlines():
        if not line.startswith("  "):
            break
        names.append(line.split()[0])
    return names


def longrope_invocations() -> list[list[str]]:
    """Arguments after `longrope` / `-m longrope_cli` in every bash and console block of the README."""
    return [args for block in code_blocks(readme()) for argv in shell_commands(block) for args in longrope_calls(argv)]


def test_command_table_lists_exactly_the_cli_commands():
    documented = re.findall(r"^\| `longrope (\w+)` \|", readme(), re.M)
    assert documented == cli_commands(), "the README's command table and `longrope --help` disagree"


def test_every_documented_command_flag_and_key_exists():
    calls = longrope_invocations()
    assert len(calls) > 20, "the README's shell blocks were not parsed"
    problems = [problem for args in calls for problem in longrope_usage_problems(args)]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- recipe keys


def table_keys(text: str) -> list[str]:
    """Recipe keys named in the first cell of the README's tables: `search.a/b/c`, `search.a, b` and
    `search.a` / `b` share the first key's section; `key=value` rows count their keys."""
    keys = []
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        names = re.findall(r"`([^`]+)`", line.split("|")[1])
        if not names or names[0].split(".")[0] not in SECTIONS:
            continue
        current = names[0].split(".")[0]
        for name in names:
            for part in re.split(r"[/,\s]+", name):
                part = part.split("=", 1)[0].strip()
                if not part:
                    continue
                if "." in part:
                    current, _, key = part.partition(".")
                else:
                    key = part
                keys.append(f"{current}.{key}")
    return keys


def prose_keys(text: str) -> set[str]:
    """`section.key` anywhere in the README (prose, overrides, `STAGE.section.key=...`), file names excluded."""
    found = re.finditer(rf"(?<![\w/-])({'|'.join(SECTIONS)})\.([a-z_]+)(?![\w.])", text)
    return {f"{m.group(1)}.{m.group(2)}" for m in found if m.group(2) not in FILE_SUFFIXES}


def test_every_recipe_key_the_readme_names_exists():
    keys = schema_keys()
    tables = table_keys(readme())
    assert len(tables) > 30, "the README's key tables were not parsed"
    unknown = [k for k in tables if k not in keys]
    assert not unknown, f"README tables name keys the recipe does not have: {unknown}"
    prose = prose_keys(readme())
    assert len(prose) > 30, "the README's keys were not parsed"
    assert not sorted(prose - keys), f"the README names keys the recipe does not have: {sorted(prose - keys)}"


def test_search_key_table_covers_every_search_key():
    documented = set(table_keys(section("`longrope search` and `longrope readjust`")))
    missing = sorted(k for k in schema_keys() if k.startswith("search.") and k not in documented)
    assert not missing, f"search keys without a row in the README's key table: {missing}"


def test_eval_key_list_is_the_eval_section():
    line = re.search(r"`eval:` keys: (.*?)\(`longrope recipe fields`\)", section("`longrope eval`"), re.S)
    assert line, "README lost its list of eval: keys"
    listed = [f"eval.{k}" for k in re.findall(r"`(\w+)`", line.group(1))]
    assert sorted(listed) == sorted(k for k in schema_keys() if k.startswith("eval.")), \
        "the README's list of eval: keys is not the recipe's eval section"


# ---------------------------------------------------------------- make targets and CI


def make_targets_named() -> set[str]:
    names = set(re.findall(r"`make ([a-z][\w-]*)", readme()))
    for block in code_blocks(readme()):
        names.update(argv[1] for argv in shell_commands(block) if argv[0] == "make" and len(argv) > 1)
    names.update(re.findall(r"make (recipe-[\w-]+)", readme()))
    return names


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_every_make_target_the_readme_names_exists_and_make_test_runs_everything():
    names = make_targets_named()
    assert {"install", "demo", "test", "test-unit", "lint", "bench", "gpu-check"} <= names
    for target in sorted(names):
        done = subprocess.run(["make", "-n", target], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert done.returncode == 0, f"make {target}: {done.stderr}"
    test = subprocess.run(["make", "-n", "test"], capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
    assert pytest_args(test)[:2] == ["-m", ""], test  # -m "": every marker, integration included
    unit = subprocess.run(["make", "-n", "test-unit"], capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
    assert "-m" not in pytest_args(unit), unit  # the default selection of setup.cfg's addopts: unit tests only


def pytest_args(make_dry_run: str) -> list[str]:
    """The arguments after `-m pytest` in the output of `make -n`."""
    line = next(line for line in make_dry_run.splitlines() if "-m pytest" in line)
    argv = shlex.split(line)
    return argv[argv.index("pytest") + 1:]


def test_ci_runs_the_readme_test_command():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in ci if line and not line.startswith("#")]
    assert commands[-1] == "make test"
    assert "make test" in section("The two commands")


# ---------------------------------------------------------------- the examples run as written


@pytest.mark.integration
@requires_testbed
def test_readme_python_example_runs(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    before = float(re.search(r"before \{2048: ([\d.]+)\}", out.stdout).group(1))
    after = float(re.search(r"after +\{2048: ([\d.]+)\}", out.stdout).group(1))
    assert after < before, out.stdout  # the searched factors beat plain RoPE at 8x
    assert "torch.Size([1, 2048, 2048])" in lines
    assert (tmp_path / "factors-2k.json").is_file()


def quick_start() -> str:
    blocks = code_blocks(section("Quick start"), ("bash",))
    assert len(blocks) == 1, "the Quick start has one bash block"
    return blocks[0]


def test_quick_start_is_parsed():
    commands = shell_commands(quick_start())
    assert [c[:2] for c in commands] == [[".", ".venv/bin/activate"], ["longrope", "search"], ["longrope", "eval"],
                                         ["longrope", "export"], ["python", "-c"]]


@pytest.mark.integration
@pytest.mark.slow  # 3-6 min on 2 shared CPU cores: the block's search alone is 160 evaluations at 2k
@requires_testbed
def test_quick_start_runs_as_written(tmp_path):
    """The Quick start block, unchanged, in a fresh folder whose .venv is the environment running the tests."""
    venv = Path(sys.prefix)
    if (venv / "bin" / "activate").is_file():
        (tmp_path / ".venv").symlink_to(venv, target_is_directory=True)
    else:  # not a venv (e.g. conda): an activate that puts this python's bin first
        (tmp_path / ".venv" / "bin").mkdir(parents=True)
        (tmp_path / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    script = tmp_path / "quick-start.sh"
    script.write_text(quick_start())
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(["bash", "-e", "-o", "pipefail", str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1800, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.strip().splitlines()[-1] == "longrope"  # plain transformers reads the exported rope_type
    factors = json.loads((tmp_path / "runs" / "search-2k" / "factors.json").read_text())
    assert factors["target_length"] == 2048 and factors["start_tokens"] == 0  # n-hat 0: it exports
    assert factors["provenance"]["evaluations"] == 160  # --max-evals
    results = json.loads((tmp_path / "runs" / "eval-2k" / "results.json").read_text())
    ppl = {(c["method"], c["length"]): c["perplexity"] for c in results["perplexity"]}
    methods = ["none", "pi", "ntk", "dynamic-ntk", "yarn", "search-2k"]
    assert [m["label"] for m in results["methods"]] == methods
    assert set(ppl) == {(m, n) for m in methods for n in (256, 512, 1024, 2048, 4096)}
    # the searched factors, at the length they were searched for, beat plain RoPE, PI and NTK
    assert ppl[("search-2k", 2048)] < min(ppl[(m, 2048)] for m in ("none", "pi", "ntk")), ppl
    exported = re.search(r"from_pretrained\('([^']+)'\)", quick_start()).group(1)  # the folder the block loads
    config = json.loads((tmp_path / exported / "config.json").read_text())
    assert config["rope_scaling"]["long_factor"] == factors["long_factor"]

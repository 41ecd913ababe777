"""The README's Python example runs as written (so it can never rot)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_testbed

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- api-example:[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its api-example block"
    return match.group(1)


def test_readme_names_the_test_and_demo_commands():
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci


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

"""Kill matrix (issue #15): every command SIGKILLed at a random moment, then resumed, gives the result of an
uninterrupted run, and no file in its output folder is ever torn.

Each case runs the command twice as a subprocess with the same single-threaded arithmetic: once uninterrupted
(the reference, timed: T seconds from start to exit, and W, when its first file appeared) and once killed at a
seeded uniform moment in [W, 0.98 T] after its start: torch + transformers imports are most of T, so the window
starts where the command begins to write. A kill may still land before a write; the resume must give the
reference result all the same. After the kill every *.json in the
folder must parse as strict JSON (no NaN / Infinity) and every line of a *.jsonl too, except a torn last line of
candidates.jsonl, which `CandidateLog.read` drops (search/state.py). Temporary files of atomic writes
(`.<name>.<random>.tmp`) may remain after a SIGKILL; they are listed, never parsed. Then the command is resumed
(`--resume`; `longrope run` is simply rerun) and its result compared, exactly, to the reference.

The seed of every random choice is printed and is in every assertion message; replay a failure with
`LONGROPE_KILL_SEED=<seed> .venv/bin/python -m pytest -m "" tests/test_kill_matrix.py -k <case>`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import small_search, tiny_pipeline_recipe

pytestmark = pytest.mark.integration

CASES = ("search", "readjust", "eval", "finetune", "run")
KILL_END = 0.98  # of the reference's wall time T; the window opens when the reference wrote its first file
TIMEOUT = 300  # seconds: any single command (they take ~5 s here)
# Append logs whose reader tolerates a torn last line (a kill mid-write): CandidateLog.read drops it.
TOLERATES_TORN_LAST_LINE = {"candidates.jsonl"}
TEMP_FILE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # outputs._create_temp: .<name>.<12 hex>.tmp
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def kill_seed() -> int:
    """The seed of this test's random choices: LONGROPE_KILL_SEED if set (to replay a failure), else fresh."""
    return int(os.environ.get("LONGROPE_KILL_SEED") or random.SystemRandom().randrange(2**32))


@dataclass
class Finished:
    out: Path
    seconds: float  # wall time, subprocess start to exit
    first_write: float  # subprocess start to the first file in `out`


def longrope(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`python -m longrope_cli ARGS` started in `cwd`, stdout and stderr appended to `log`."""
    with open(log, "ab") as handle:
        handle.write(f"\n$ longrope {' '.join(args)}\n".encode())
        handle.flush()
        return subprocess.Popen([sys.executable, "-m", "longrope_cli", *args], cwd=cwd, env=ENV,
                                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT)


def tail(log: Path, n: int = 3000) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-n:] if log.is_file() else ""


def run_to_end(args: list[str], cwd: Path, log: Path, what: str, watch: Path | None = None) -> tuple[float, float]:
    """Run a command to its end (it must succeed): (wall time, when the first file appeared in `watch`)."""
    started = time.monotonic()
    proc = longrope(args, cwd, log)
    first = None
    while proc.poll() is None and time.monotonic() - started < TIMEOUT:
        if first is None and watch is not None and watch.is_dir() and any(p.is_file() for p in watch.rglob("*")):
            first = time.monotonic() - started
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{what}: longrope {' '.join(args)} ran past {TIMEOUT} s\n{tail(log)}")
    seconds = time.monotonic() - started
    assert proc.returncode == 0, f"{what}: longrope {' '.join(args)} exited {proc.returncode}\n{tail(log)}"
    return seconds, first if first is not None else 0.3 * seconds


# ----------------------------------------------------------------------------- the commands


def search_args(model: Path, corpus: Path, out: Path) -> list[str]:
    return ["search", "--model", str(model), "--device", "cpu", "--target", "128", "--out", str(out),
            "--no-progress", f"data.corpus={corpus}", *small_search(iterations=3, attention_search=True)]


def readjust_args(model: Path, corpus: Path, out: Path, ref_search: Path) -> list[str]:
    return ["readjust", "--model", str(model), "--device", "cpu", "--factors", str(ref_search), "--lengths", "32,64",
            "--out", str(out), "--no-progress", f"data.corpus={corpus}", "readjust.population=6",
            "readjust.iterations=3", "readjust.documents=2"]


def eval_args(model: Path, corpus: Path, out: Path, ref_search: Path) -> list[str]:
    return ["eval", "--model", str(model), "--device", "cpu", "--lengths", "64,128,256", "--documents", "2",
            "--methods", f"none,pi,yarn,{ref_search}", "--out", str(out), "--no-progress", f"data.corpus={corpus}",
            "eval.plots=false"]


def finetune_args(model: Path, corpus: Path, out: Path, ref_search: Path) -> list[str]:
    return ["finetune", "--model", str(model), "--device", "cpu", "--factors", str(ref_search), "--out", str(out),
            "--no-progress", f"data.corpus={corpus}", "finetune.steps=6", "finetune.batch_size=2",
            "finetune.save_every=1"]


def write_recipe(path: Path, model: Path, corpus: Path) -> Path:
    """conftest.tiny_pipeline_recipe as a file."""
    recipe = tiny_pipeline_recipe(model, corpus)
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def command_args(case: str, model: Path, corpus: Path, out: Path, ref_search: Path, work: Path) -> list[str]:
    """The uninterrupted / killed command of `case` (the resume adds --resume, or reruns it for `run`)."""
    if case == "search":
        return search_args(model, corpus, out)
    if case == "readjust":
        return readjust_args(model, corpus, out, ref_search)
    if case == "eval":
        return eval_args(model, corpus, out, ref_search)
    if case == "finetune":
        return finetune_args(model, corpus, out, ref_search)
    recipe = work / "pipeline.yaml"
    if not recipe.is_file():
        write_recipe(recipe, model, corpus)
    return ["run", str(recipe), "--out", str(out), "--no-progress"]


def resume_args(case: str, args: list[str]) -> list[str]:
    return args if case == "run" else [*args, "--resume"]


# ----------------------------------------------------------------------------- what a run produced


def _cells(results: Path) -> list[tuple[str, int, Any]]:
    data = json.loads(results.read_text(encoding="utf-8"))
    return sorted((c["method"], int(c["length"]), c["perplexity"]) for c in data["perplexity"])


def _weights(path: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """Every tensor of a safetensors file: dtype, shape and a digest of its exact bytes."""
    from safetensors.torch import load_file

    return {name: (str(t.dtype), tuple(t.shape), hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()
                                                                .tobytes()).hexdigest())
            for name, t in sorted(load_file(path).items())}


def outcome(case: str, out: Path) -> dict[str, Any]:
    """The numbers of a finished `case` that the resumed run must reproduce exactly."""
    from longrope_cli.rope.factors import load_factors

    if case == "search":
        f = load_factors(out / "factors.json")
        return {"long_factor": f.long_factor, "start_tokens": f.start_tokens, "attention": f.attention,
                "attention_policy": f.attention_policy, "perplexity": f.provenance.get("perplexity")}
    if case == "readjust":
        f = load_factors(out / "factors.json")
        return {"short_factor": f.short_factor, "long_factor": f.long_factor}
    if case == "eval":
        return {"cells": _cells(out / "results.json")}
    if case == "finetune":
        metrics = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        return {"losses": [(r["step"], r["loss"]) for r in map(json.loads, filter(str.strip, metrics))],
                "weights": _weights(out / "model" / "model.safetensors")}
    f = load_factors(out / "short" / "factors.json")
    return {"short_factor": f.short_factor, "long_factor": f.long_factor, "start_tokens": f.start_tokens,
            "attention": f.attention, "cells": _cells(out / "ev" / "results.json")}


def differences(reference: dict[str, Any], resumed: dict[str, Any]) -> list[str]:
    lines = []
    for key in sorted(set(reference) | set(resumed)):
        want, got = reference.get(key), resumed.get(key)
        if want == got:
            continue
        if isinstance(want, dict) and isinstance(got, dict):
            names = sorted(n for n in set(want) | set(got) if want.get(n) != got.get(n))
            lines.append(f"{key}: {len(names)} differ: {names[:8]}")
        else:
            lines.append(f"{key}: reference {want!r}\n{' ' * len(key)}  resumed   {got!r}")
    return lines


# ----------------------------------------------------------------------------- torn files


def _strict(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def strict_loads(text: str | bytes) -> Any:
    return json.loads(text, parse_constant=_strict)


def torn_files(out: Path) -> tuple[list[str], list[str]]:
    """(problems, leftover temp files) in `out`: a *.json that is not strict JSON, a *.jsonl line that is not
    (a torn last line of a log whose reader drops it excepted)."""
    problems, leftovers = [], []
    if not out.exists():
        return problems, leftovers
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        where = str(path.relative_to(out))
        if TEMP_FILE.match(path.name):
            leftovers.append(where)
            continue
        if path.suffix == ".json":
            try:
                strict_loads(path.read_bytes())
            except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                problems.append(f"{where}: {err}")
        elif path.suffix == ".jsonl":
            raw = path.read_bytes()
            lines = raw.split(b"\n")
            last = lines.pop()  # after the final newline: b"" unless the last line is torn
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    strict_loads(line)
                except ValueError as err:
                    problems.append(f"{where} line {number}: {err}: {line[:80]!r}")
            if last.strip() and path.name not in TOLERATES_TORN_LAST_LINE:
                problems.append(f"{where}: last line without a newline (torn), and its reader does not drop it: "
                                f"{last[:80]!r}")
    return problems, leftovers


# ----------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def reference_search(tiny_model_dir, tiny_corpus, tmp_path_factory) -> Finished:
    """An uninterrupted search: the reference of the `search` case and the factors the other cases read."""
    work = tmp_path_factory.mktemp("kill-ref")
    out = work / "ref-search"
    seconds, first = run_to_end(search_args(tiny_model_dir, tiny_corpus, out), work, work / "ref.log",
                                "reference search", watch=out)
    return Finished(out, seconds, first)


@pytest.mark.parametrize("case", CASES)
def test_sigkill_then_resume_gives_the_uninterrupted_result(case, reference_search, tiny_model_dir, tiny_corpus,
                                                             tmp_path):
    seed = kill_seed()
    replay = f'LONGROPE_KILL_SEED={seed} .venv/bin/python -m pytest -m "" tests/test_kill_matrix.py -k {case}'
    print(f"kill seed: {replay}")  # shown by pytest with a failure's captured output
    rng = random.Random(f"{seed}-{case}")  # every random choice of this case comes from it
    ref_search = reference_search.out
    log = tmp_path / "commands.log"

    if case == "search":
        reference = reference_search
    else:
        ref_out = tmp_path / "reference"
        args = command_args(case, tiny_model_dir, tiny_corpus, ref_out, ref_search, tmp_path)
        reference = Finished(ref_out, *run_to_end(args, tmp_path, log, f"{replay}: reference {case}", watch=ref_out))
    expected = outcome(case, reference.out)

    out = tmp_path / "killed"
    args = command_args(case, tiny_model_dir, tiny_corpus, out, ref_search, tmp_path)
    moment = rng.uniform(reference.first_write, KILL_END * reference.seconds)
    aim = (f"{replay}: {case} killed {moment:.2f} s after its start (reference: first write at "
           f"{reference.first_write:.2f} s, T = {reference.seconds:.2f} s)")
    print(aim)
    started = time.monotonic()
    proc = longrope(args, tmp_path, log)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(0.0, moment - (time.monotonic() - started)))
    proc.send_signal(signal.SIGKILL)  # a no-op if it already finished
    code = proc.wait(timeout=TIMEOUT)
    assert code in (-signal.SIGKILL, 0), f"{aim}: exit {code}\n{tail(log)}"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.exists() else []
    state = f"{aim}: exit {code}, {len(files)} files at the kill"
    print(state, files)

    problems, leftovers = torn_files(out)
    assert not problems, f"{state}: torn files after the kill: {problems}; temp files left: {leftovers}"

    run_to_end(resume_args(case, args), tmp_path, log, f"{state}: resume")
    problems, after = torn_files(out)
    assert not problems, f"{state}: torn files after the resume: {problems}; temp files left: {after}"
    assert not after, f"{state}: the resume left the kill's temporary files: {after}; replay: {replay}"
    try:
        resumed = outcome(case, out)
    except (OSError, ValueError, KeyError) as err:
        raise AssertionError(f"{state}: the resumed {case} left no readable result ({err!r}); replay: {replay}") from err
    diff = differences(expected, resumed)
    assert not diff, (f"{state} (temp files left by the kill: {leftovers}): the resumed {case} differs from the "
                      "uninterrupted one:\n" + "\n".join(diff) + f"\nreplay: {replay}")
    if case == "run":
        stages = [p.name for p in out.iterdir() if p.is_dir()]
        assert all((out / s / "complete.json").is_file() for s in stages), f"{state}: {stages}; replay: {replay}"
    else:
        assert (out / "complete.json").is_file(), f"{state}: no complete.json after the resume; replay: {replay}"

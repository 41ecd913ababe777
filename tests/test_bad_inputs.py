"""The bad-input matrix: every mistake a user can make on the command line ends in one `error: ...` line, exit
status 2, no traceback, and leaves the output folder (and everything around it) exactly as it was.

Each case builds its inputs in a fresh folder that also holds copies of a finished search and a finished
fine-tune; the whole folder is hashed before and after the refused command.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import small_search
from longrope_cli.cli.main import cli

TARGET = "128"  # 2x the tiny model's window of 64


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tiny_corpus, tmp_path_factory) -> dict[str, Path]:
    """A finished search (n-hat 0) and a finished 2-step fine-tune of the tiny model, made once."""
    root = tmp_path_factory.mktemp("finished")
    search = root / "search"
    done = invoke("search", "--model", tiny_model_dir, "--target", TARGET, "--out", search, "--no-progress",
                  f"data.corpus={tiny_corpus}", "search.start_tokens=0", "search.iterations=1",
                  "search.attention_search=false", *small_search())
    assert done.exit_code == 0, done.output
    ft = root / "ft"
    done = invoke("finetune", "--model", tiny_model_dir, "--factors", search, "--out", ft, "--no-progress",
                  f"data.corpus={tiny_corpus}", "finetune.steps=2", "finetune.batch_size=1", "finetune.save_every=1",
                  "finetune.keep_checkpoint=true")
    assert done.exit_code == 0, done.output
    return {"search": search, "ft": ft}


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file and folder below root: content hash (files) and permission bits."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_file() and not path.is_symlink():
            out[rel] = (hashlib.sha1(path.read_bytes()).hexdigest(), path.stat().st_mode & 0o777)
        else:
            out[rel] = ("dir" if path.is_dir() else "other", path.stat().st_mode & 0o777 if path.exists() else 0)
    return out


def factor_file(where: Path, name: str, change: Callable[[dict], None] | None = None, text: str | None = None,
                base: Path | None = None) -> Path:
    """A copy of the finished search's factors.json with `change` applied (or raw `text`)."""
    path = where / name
    if text is not None:
        path.write_text(text, encoding="utf-8")
        return path
    data = json.loads((base / "factors.json").read_text())
    if change:
        change(data)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@dataclass
class Case:
    id: str
    args: Callable[[dict], list]  # from the context (paths) to the command line
    expect: str  # a piece of the one error line
    setup: Callable[[dict], None] = field(default=lambda ctx: None)


def _set(key: str, value):
    def change(data: dict) -> None:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return change


def _nest(depth: int):
    return "[" * depth + "]" * depth


def S(ctx, *extra):  # noqa: N802 - a search command on the tiny model
    return ["search", "--model", ctx["model"], "--target", TARGET, "--out", ctx["tmp"] / "s", "--no-progress",
            f"data.corpus={ctx['corpus']}", *small_search(), *extra]


def E(ctx, *extra):  # noqa: N802
    return ["eval", "--model", ctx["model"], "--lengths", "64,128", "--documents", "1", "--out", ctx["tmp"] / "e",
            "--no-progress", f"data.corpus={ctx['corpus']}", "eval.plots=false", *extra]


def F(ctx, *extra):  # noqa: N802
    return ["finetune", "--model", ctx["model"], "--out", ctx["tmp"] / "f", "--no-progress",
            f"data.corpus={ctx['corpus']}", "finetune.steps=2", "finetune.batch_size=1", *extra]


def R(ctx, *extra):  # noqa: N802
    return ["readjust", "--model", ctx["model"], "--out", ctx["tmp"] / "r", "--no-progress",
            f"data.corpus={ctx['corpus']}", "readjust.population=4", "readjust.iterations=1", "readjust.documents=1",
            "--lengths", "32,64", *extra]


def X(ctx, *extra):  # noqa: N802
    return ["export", "--model", ctx["model"], *extra]


def bad_factors(name: str, change=None, text=None):
    """(setup, path key) for a factor file variant written into the case folder as ctx[name]."""
    def setup(ctx):
        ctx[name] = factor_file(ctx["tmp"], name + ".json", change, text, base=ctx["search"])
    return setup


def model_copy(corrupt: str):
    def setup(ctx):
        copy = ctx["tmp"] / "model-copy"
        shutil.copytree(ctx["model"], copy)
        if corrupt == "weights":
            (copy / "model.safetensors").write_bytes(b"not a safetensors file")
        elif corrupt == "config":
            (copy / "config.json").write_text("{ not json", encoding="utf-8")
        ctx["model_copy"] = copy
    return setup


def recipe_file(text: bytes):
    def setup(ctx):
        path = ctx["tmp"] / "bad.yaml"
        path.write_bytes(text)
        ctx["recipe"] = path
    return setup


def file_at(name: str, text: str = "x"):
    def setup(ctx):
        (ctx["tmp"] / name).write_text(text, encoding="utf-8")
        ctx[name] = ctx["tmp"] / name
    return setup


def user_files_in(name: str):
    def setup(ctx):
        folder = ctx["tmp"] / name / "model"
        folder.mkdir(parents=True)
        (folder / "my-notes.txt").write_text("mine", encoding="utf-8")
        ctx[name] = ctx["tmp"] / name
    return setup


def killed_finetune(ctx):
    """The finished fine-tune as a kill would have left it: checkpoint kept, no model, no complete.json."""
    shutil.rmtree(ctx["ft"] / "model")
    (ctx["ft"] / "complete.json").unlink()


def finished_eval(ctx):
    done = invoke("eval", "--model", ctx["model"], "--lengths", "64", "--documents", "1", "--methods", "none",
                  "--out", ctx["tmp"] / "ev", "--no-progress", f"data.corpus={ctx['corpus']}", "eval.plots=false")
    assert done.exit_code == 0, done.output
    ctx["ev"] = ctx["tmp"] / "ev"


def both(*setups):
    def setup(ctx):
        for one in setups:
            one(ctx)
    return setup


CASES = [
    # ---- search: recipe values
    Case("search-no-target", lambda c: [a for a in S(c) if a not in ("--target", TARGET)], "search.target is not set"),
    Case("search-unknown-key", lambda c: S(c, "search.populaton=3"), "did you mean 'search.population'"),
    Case("search-wrong-type", lambda c: S(c, "search.population=abc"), "search.population"),
    Case("search-population-0", lambda c: S(c, "search.population=0"), "search.population=0 is out of range"),
    Case("search-max-minutes-negative", lambda c: S(c, "search.max_minutes=-1"), "search.max_minutes"),
    Case("search-max-minutes-nan", lambda c: S(c, "search.max_minutes=.nan"), "search.max_minutes"),
    Case("search-factor-step-inf", lambda c: S(c, "search.factor_step=.inf"), "search.factor_step"),
    Case("search-mutation-prob-2", lambda c: S(c, "search.mutation_prob=2"), "search.mutation_prob"),
    Case("search-target-short", lambda c: S(c, "--target", "32"), "not larger than the model's original window"),
    Case("search-target-text", lambda c: S(c, "--target", "lots"), "lots"),
    Case("search-critical-bogus", lambda c: S(c, "search.critical_dim=banana"), "search.critical_dim"),
    Case("search-attention-bogus", lambda c: S(c, "search.attention=banana"), "search.attention='banana'"),
    Case("search-no-start-choices", lambda c: S(c, "search.start_token_choices=[]"), "search.start_token_choices"),
    Case("search-fitness-bogus", lambda c: S(c, "search.fitness=bleu"), "search.fitness"),
    Case("search-backend-bogus", lambda c: S(c, "search.backend=mpi"), "search.backend"),
    Case("search-dtype-bogus", lambda c: S(c, "model.dtype=float8"), "model.dtype"),
    Case("search-device-cuda", lambda c: S(c, "--device", "cuda"), "CUDA is not available"),
    Case("search-device-bogus", lambda c: S(c, "--device", "tpu9"), "device"),
    Case("search-section-not-mapping", lambda c: S(c, "search=3"), "search"),
    Case("search-override-no-equals", lambda c: S(c, "search.population"), "search.population"),
    # ---- search: files and folders
    Case("search-model-missing", lambda c: [*S(c)[:2], c["tmp"] / "nope", *S(c)[3:]], "not found"),
    Case("search-model-is-json", lambda c: [*S(c)[:2], c["x.json"], *S(c)[3:]], "is a file, not a model", file_at("x.json", "{}")),
    Case("search-model-no-config", lambda c: [*S(c)[:2], c["tmp"], *S(c)[3:]], "no config.json"),
    Case("search-model-corrupt-weights", lambda c: [*S(c)[:2], c["model_copy"], *S(c)[3:]], "cannot load model",
         model_copy("weights")),
    Case("search-model-corrupt-config", lambda c: [*S(c)[:2], c["model_copy"], *S(c)[3:]], "cannot load model",
         model_copy("config")),
    Case("search-recipe-not-utf8", lambda c: ["search", c["recipe"], "--target", TARGET],
         "not UTF-8", recipe_file(b"search:\n  population: \xff\xfe\n")),
    Case("search-recipe-bad-yaml", lambda c: ["search", c["recipe"]], "not valid YAML", recipe_file(b"a: [1,\n")),
    Case("search-recipe-a-list", lambda c: ["search", c["recipe"]], "mapping", recipe_file(b"- 1\n- 2\n")),
    Case("search-recipe-missing", lambda c: ["search", c["tmp"] / "missing.yaml"], "not found"),
    Case("search-corpus-missing", lambda c: S(c, f"data.corpus={c['tmp'] / 'no-corpus'}"), "no-corpus"),
    Case("search-corpus-too-short", lambda c: S(c, "--target", "1m"), "1m" if False else "token"),
    Case("search-base-factors-missing", lambda c: S(c, f"search.base_factors={c['tmp'] / 'none.json'}"),
         "none.json"),
    Case("search-seed-factors-bad", lambda c: S(c, f"search.seed_factors=[{c['trunc']}]"), "trunc.json",
         bad_factors("trunc", text='{"long_factor": [1.0, ')),
    Case("search-finished-no-resume", lambda c: S(c, "--out", c["search"]), "--resume"),
    Case("search-out-parent-is-file", lambda c: S(c, "--out", c["afile"] / "sub"), "afile", file_at("afile")),
    Case("search-out-is-file", lambda c: S(c, "--out", c["afile"]), "afile", file_at("afile")),
    Case("search-out-holds-user-recipe", lambda c: S(c, "--out", c["tmp"] / "mine"), "recipe.yaml",
         lambda ctx: ((ctx["tmp"] / "mine").mkdir(), (ctx["tmp"] / "mine" / "recipe.yaml").write_text("my: own\n"))),
    # ---- factor files, given to eval --methods
    Case("eval-factors-model-list", lambda c: E(c, "--methods", c["f"]), "model",
         bad_factors("f", _set("model", [1, 2]))),
    Case("eval-factors-theta-string", lambda c: E(c, "--methods", c["f"]), "rope_theta",
         bad_factors("f", _set("model.rope_theta", "big"))),
    Case("eval-factors-provenance-string", lambda c: E(c, "--methods", c["f"]), "provenance",
         bad_factors("f", _set("provenance", "by hand"))),
    Case("eval-factors-nested-deep", lambda c: E(c, "--methods", c["f"]), "f.json",
         bad_factors("f", text='{"long_factor": ' + _nest(100000) + "}")),
    Case("eval-factors-truncated", lambda c: E(c, "--methods", c["f"]), "f.json", bad_factors("f", text='{"lo')),
    Case("eval-factors-empty", lambda c: E(c, "--methods", c["f"]), "f.json", bad_factors("f", text="")),
    Case("eval-factors-a-list", lambda c: E(c, "--methods", c["f"]), "f.json", bad_factors("f", text="[1, 2]")),
    Case("eval-factors-not-utf8", lambda c: E(c, "--methods", c["f"]), "f.json",
         bad_factors("f", text="\udcff") if False else both(lambda ctx: (ctx["tmp"] / "f.json").write_bytes(
             b'{"long_factor": "\xff"}'), lambda ctx: ctx.update(f=ctx["tmp"] / "f.json"))),
    Case("eval-factors-wrong-pairs", lambda c: E(c, "--methods", c["f"]), "pairs",
         bad_factors("f", _set("long_factor", [1.0, 2.0]))),
    Case("eval-factors-nan", lambda c: E(c, "--methods", c["f"]), "long_factor",
         bad_factors("f", lambda d: d["long_factor"].__setitem__(0, "nan"))),
    Case("eval-factors-string-item", lambda c: E(c, "--methods", c["f"]), "long_factor",
         bad_factors("f", lambda d: d["long_factor"].__setitem__(0, "two"))),
    Case("eval-factors-target-string", lambda c: E(c, "--methods", c["f"]), "target_length",
         bad_factors("f", _set("target_length", "2k"))),
    Case("eval-factors-target-negative", lambda c: E(c, "--methods", c["f"]), "target_length",
         bad_factors("f", _set("target_length", -5))),
    Case("eval-factors-start-negative", lambda c: E(c, "--methods", c["f"]), "start_tokens",
         bad_factors("f", _set("start_tokens", -1))),
    Case("eval-factors-attention-string", lambda c: E(c, "--methods", c["f"]), "attention",
         bad_factors("f", _set("attention.factor", "hot"))),
    Case("eval-factors-folder-without-file", lambda c: E(c, "--methods", c["tmp"] / "empty-dir"), "empty-dir",
         lambda ctx: (ctx["tmp"] / "empty-dir").mkdir()),
    # ---- eval
    Case("eval-method-typo", lambda c: E(c, "--methods", "none,yran"), "did you mean 'yarn'"),
    Case("eval-method-missing-file", lambda c: E(c, "--methods", "none,runs/none/factors.json"), "factors.json"),
    Case("eval-no-lengths", lambda c: [a for a in E(c, "eval.lengths=[]", "--methods", "none")
                                       if a not in ("--lengths", "64,128")], "eval.lengths"),
    Case("eval-documents-0", lambda c: E(c, "--documents", "0", "--methods", "none"), "eval.documents"),
    Case("eval-depth-2", lambda c: E(c, "eval.passkey_depths=[2]", "--methods", "none"), "eval.passkey_depths"),
    Case("eval-mode-bogus", lambda c: E(c, "eval.mode=zigzag", "--methods", "none"), "eval.mode"),
    Case("eval-into-finished-with-bad-file", lambda c: E(c, "--methods", c["f"], "--out", c["ev"]), "pairs",
         both(bad_factors("f", _set("long_factor", [1.0, 2.0])), finished_eval)),
    # ---- finetune
    Case("finetune-no-factors", lambda c: F(c), "finetune.factors is not set"),
    Case("finetune-lr-nan", lambda c: F(c, "--factors", c["search"], "finetune.lr=.nan"), "finetune.lr"),
    Case("finetune-lr-0", lambda c: F(c, "--factors", c["search"], "finetune.lr=0"), "finetune.lr"),
    Case("finetune-steps-0", lambda c: F(c, "--factors", c["search"], "--steps", "0"), "finetune.steps"),
    Case("finetune-target-short", lambda c: F(c, "--factors", c["search"], "--target", "32"), "finetune.target"),
    Case("finetune-batch-not-multiple", lambda c: F(c, "--factors", c["search"], "finetune.batch_size=3",
                                                    "finetune.micro_batch_size=2"), "multiple"),
    Case("finetune-factors-other-model", lambda c: F(c, "--factors", c["f"]), "pairs",
         bad_factors("f", _set("long_factor", [1.0, 2.0]))),
    Case("finetune-into-finished", lambda c: F(c, "--factors", c["search"], "--out", c["ft"]), "--resume"),
    Case("finetune-resume-other-lr", lambda c: F(c, "--factors", c["search"], "finetune.lr=1e-3", "--resume",
                                                 "--out", c["ft"]), "finetune.lr", killed_finetune),
    Case("finetune-resume-other-steps", lambda c: F(c, "--factors", c["search"], "--resume", "--out", c["ft"],
                                                    "--steps", "5"), "finetune.steps", killed_finetune),
    Case("finetune-resume-other-schedule", lambda c: F(c, "--factors", c["search"], "--resume", "--out", c["ft"],
                                                       "finetune.schedule=cosine"), "finetune.schedule",
         killed_finetune),
    Case("finetune-warmup-negative", lambda c: F(c, "--factors", c["search"], "finetune.warmup_steps=-1"),
         "finetune.warmup_steps"),
    Case("finetune-schedule-bogus", lambda c: F(c, "--factors", c["search"], "finetune.schedule=step"),
         "finetune.schedule"),
    # ---- readjust
    Case("readjust-no-factors", lambda c: R(c), "readjust.factors is not set"),
    Case("readjust-lengths-too-long", lambda c: R(c, "--factors", c["search"], "--lengths", "32,512"),
         "exceed the original window"),
    Case("readjust-factor-max-0", lambda c: R(c, "--factors", c["search"], "readjust.factor_max=0"),
         "readjust.factor_max"),
    Case("readjust-population-1", lambda c: R(c, "--factors", c["search"], "readjust.population=1"),
         "readjust.population"),
    Case("readjust-factors-no-target", lambda c: R(c, "--factors", c["f"]), "target",
         bad_factors("f", _set("target_length", None))),
    # ---- export
    Case("export-no-factors", lambda c: X(c, "--out", c["tmp"] / "x"), "export.factors is not set"),
    Case("export-out-cwd-with-user-recipe", lambda c: X(c, "--factors", c["search"], "--out", "."), "recipe.yaml",
         lambda ctx: (ctx["tmp"] / "recipe.yaml").write_text("model: {name: testbed}\n")),
    Case("export-over-user-files", lambda c: X(c, "--factors", c["search"], "--out", c["mine"]), "did not write",
         user_files_in("mine")),
    Case("export-target-string", lambda c: X(c, "--factors", c["f"], "--out", c["tmp"] / "x"), "target_length",
         bad_factors("f", _set("target_length", "2k"))),
    Case("export-target-short", lambda c: X(c, "--factors", c["search"], "--target", "32", "--out",
                                            c["tmp"] / "x"), "target"),
    Case("export-n-hat", lambda c: X(c, "--factors", c["f"], "--out", c["tmp"] / "x"), "n-hat",
         bad_factors("f", _set("start_tokens", 4))),
    Case("export-short-factors-bad", lambda c: X(c, "--factors", c["search"], "--short-factors", c["f"], "--out",
                                                 c["tmp"] / "x"), "f.json", bad_factors("f", text="{")),
    # ---- run and recipe
    Case("run-no-stages", lambda c: ["run", c["recipe"]], "has no stages", recipe_file(b"model: {name: testbed}\n")),
    Case("run-bad-command", lambda c: ["run", c["recipe"]], "did you mean 'search'",
         recipe_file(b"stages:\n  - {name: a, command: serch}\n")),
    Case("run-stage-override-typo", lambda c: ["run", c["recipe"], "a.search.populaton=3"], "search.population",
         recipe_file(b"stages:\n  - {name: a, command: search, overrides: {search.target: 2k}}\n")),
    Case("run-missing-recipe", lambda c: ["run", c["tmp"] / "nope.yaml"], "not found"),
    Case("recipe-validate-range", lambda c: ["recipe", "validate", "tiny", "search.survivors=0"], "search.survivors"),
    Case("recipe-show-missing", lambda c: ["recipe", "show", c["tmp"] / "nope.yaml"], "not found"),
    Case("recipe-cp-exists", lambda c: ["recipe", "cp", "tiny", c["afile"]], "afile", file_at("afile")),
    Case("recipe-cp-unknown", lambda c: ["recipe", "cp", "huge", c["tmp"] / "y.yaml"], "huge"),
]


def test_the_matrix_is_large_and_covers_every_command():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert {c.id.split("-")[0] for c in CASES} >= {"search", "eval", "finetune", "readjust", "export", "run",
                                                    "recipe"}


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_mistake_is_one_line_and_changes_nothing(case, finished, tiny_model_dir, tiny_corpus, tmp_path,
                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    ctx = {"model": tiny_model_dir, "corpus": tiny_corpus, "tmp": tmp_path,
           "search": tmp_path / "done-search", "ft": tmp_path / "done-ft"}
    shutil.copytree(finished["search"], ctx["search"])
    shutil.copytree(finished["ft"], ctx["ft"])
    case.setup(ctx)
    args = case.args(ctx)
    before = snapshot(tmp_path)
    result = invoke(*args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.exit_code == 2, (result.exit_code, result.output[-3000:], result.exception)
    assert "Traceback" not in result.output and len(errors) == 1 and lines[-1] == errors[0], result.output[-3000:]
    assert case.expect in errors[0], errors[0]
    assert snapshot(tmp_path) == before  # nothing written, nothing deleted, nothing touched
    os.chdir(tmp_path)


@pytest.mark.parametrize(("command", "advice"), [("run", "complete stages are skipped"), ("search", "--resume")])
def test_ctrl_c_advice_fits_the_command(command, advice, monkeypatch):
    import click

    from longrope_cli.cli.common import user_errors

    @click.command(command)
    @user_errors
    def interrupted() -> None:
        raise KeyboardInterrupt

    result = CliRunner().invoke(interrupted, [])
    assert result.exit_code == 130 and advice in result.output
    assert ("--resume" in result.output) == (command != "run")

"""An exported directory loads in plain transformers (fresh process, no longrope import) with our logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from longrope_cli.api import export
from longrope_cli.cli.main import cli
from longrope_cli.errors import FactorFileError
from longrope_cli.models import load_model
from longrope_cli.rope.factors import FactorSet, attention_factor
from longrope_cli.rope.rotary import install_factors

PLAIN_LOAD = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        out = {n: model(ids[:, :n]).logits for n in (32, ids.shape[1])}
    assert "longrope_cli" not in sys.modules
    torch.save(out, sys.argv[3])
""")


PLAIN_TOKENIZE = textwrap.dedent("""
    import json, sys
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    ids = tok(sys.argv[2]).input_ids
    assert "longrope_cli" not in sys.modules
    print(json.dumps({"class": type(tok).__name__, "ids": ids, "text": tok.decode(ids, skip_special_tokens=True),
                      "special": [tok.bos_token, tok.eos_token, tok.pad_token]}))
""")
TEXT = "The pass key is 4821937. Remember it: 4821937."


def plain_transformers_tokens(python: str, model_dir, tmp_path) -> dict:
    """What AutoTokenizer in `python` (plain transformers, no longrope) makes of TEXT with model_dir's tokenizer."""
    script = tmp_path / "plain_tokenizer.py"  # not tokenize.py: that shadows the stdlib module
    script.write_text(PLAIN_TOKENIZE)
    done = subprocess.run([python, str(script), str(model_dir), TEXT], capture_output=True, text=True, timeout=300,
                          env={"PATH": "", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_same_tokenizer(loaded: dict, tokenizer) -> None:
    ids = tokenizer(TEXT).input_ids
    assert loaded["ids"] == ids and loaded["text"] == tokenizer.decode(ids, skip_special_tokens=True)
    assert loaded["special"] == [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]


def plain_transformers_logits(python: str, model_dir, ids: torch.Tensor, tmp_path) -> dict[int, torch.Tensor]:
    """Logits at 32 tokens and at ids' full length from `python` running plain transformers on `model_dir`."""
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_LOAD)
    subprocess.run([python, str(script), str(model_dir), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                   check=True, timeout=300, env={"PATH": "", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"})
    return torch.load(tmp_path / "out.pt")


def factor_set(pairs: int, original: int, target: int) -> FactorSet:
    long_f = [1.0 + 3.0 * i / (pairs - 1) for i in range(pairs)]
    short_f = [1.0 + 0.2 * i / (pairs - 1) for i in range(pairs)]
    return FactorSet(long_factor=long_f, short_factor=short_f, target_length=target,
                     attention=attention_factor("su", target / original, original), attention_policy="su")


def test_export_loads_in_plain_transformers_with_identical_logits(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir), device="cpu")
    factors = factor_set(lm.layout.pairs, lm.layout.original_length, 4 * lm.layout.original_length)
    out = export(lm, factors, tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        assert config[key]["rope_type"] == "longrope"
        assert len(config[key]["long_factor"]) == lm.layout.pairs
        assert config[key]["original_max_position_embeddings"] == 64
    assert config["max_position_embeddings"] == 256 and config["original_max_position_embeddings"] == 64

    ids = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(0))
    plain = plain_transformers_logits(sys.executable, out, ids, tmp_path)

    install_factors(lm.model, factors, lm.layout)
    with torch.no_grad():
        for n in (32, 200):  # below and above the original window of 64
            torch.testing.assert_close(plain[n], lm.model(ids[:, :n]).logits, atol=2e-5, rtol=1e-4)
    # the exported model is not plain RoPE: without factors the long logits differ
    plain_rope = load_model(str(tiny_model_dir), device="cpu")
    with torch.no_grad():
        assert not torch.allclose(plain[200], plain_rope.model(ids).logits, atol=1e-3)


def test_export_without_short_factors_is_the_model_eval_measured(tiny_model_dir, tmp_path):
    """A file with long factors only: eval (and the search) run them at every length, so must the export,
    on both sides of the original window (it used to write short_factor = 1.0 under the long attention)."""
    lm = load_model(str(tiny_model_dir), device="cpu")
    full = factor_set(lm.layout.pairs, lm.layout.original_length, 4 * lm.layout.original_length)
    factors = FactorSet(long_factor=full.long_factor, target_length=full.target_length, attention=full.attention,
                        attention_policy="su")
    out = export(lm, factors, tmp_path / "exported")
    ids = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(1))
    plain = plain_transformers_logits(sys.executable, out, ids, tmp_path)
    install_factors(lm.model, factors, lm.layout)
    with torch.no_grad():
        for n in (32, 200):
            torch.testing.assert_close(plain[n], lm.model(ids[:, :n]).logits, atol=2e-5, rtol=1e-4)


def test_export_refuses_start_tokens(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir), device="cpu")
    factors = FactorSet(long_factor=[2.0] * lm.layout.pairs, start_tokens=4, target_length=256)
    with pytest.raises(FactorFileError, match="n-hat=4"):
        export(lm, factors, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_export_cli(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir), device="cpu")
    path = factor_set(lm.layout.pairs, 64, 512).save(tmp_path / "factors.json", lm.layout)
    runner = CliRunner()
    result = runner.invoke(cli, ["export", "--model", str(tiny_model_dir), "--factors", str(path),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "model" / "config.json").read_text())["max_position_embeddings"] == 512
    assert {"recipe.yaml", "env.json", "log.txt", "complete.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    bad = runner.invoke(cli, ["export", "--model", str(tmp_path / "missing"), "--factors", str(path),
                              "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2
    assert bad.output.strip().startswith("error: model") and len(bad.output.strip().splitlines()) == 1


COMPAT_PYTHON = os.environ.get("LONGROPE_COMPAT_PYTHON")


def test_exported_tokenizer_names_a_class_every_supported_transformers_has(tmp_path):
    """transformers 5.x saves the test bed's tokenizer as `TokenizersBackend`, a class 4.57 lacks: the export
    writes `PreTrainedTokenizerFast` (the same class in 5.x), and plain transformers loads it unchanged."""
    lm = load_model("testbed", device="cpu")
    factors = factor_set(lm.layout.pairs, lm.layout.original_length, 4 * lm.layout.original_length)
    out = export(lm, factors, tmp_path / "exported")
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    for python in filter(None, (sys.executable, COMPAT_PYTHON)):
        assert_same_tokenizer(plain_transformers_tokens(python, out, tmp_path), lm.tokenizer)


@pytest.mark.skipif(not COMPAT_PYTHON, reason="set LONGROPE_COMPAT_PYTHON to a python with another transformers "
                                              "(e.g. 4.57) to check the export there too")
def test_export_loads_identically_in_another_transformers(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir), device="cpu")
    factors = factor_set(lm.layout.pairs, lm.layout.original_length, 4 * lm.layout.original_length)
    out = export(lm, factors, tmp_path / "exported")
    ids = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(0))
    other = plain_transformers_logits(COMPAT_PYTHON, out, ids, tmp_path)
    assert_same_tokenizer(plain_transformers_tokens(COMPAT_PYTHON, out, tmp_path), lm.tokenizer)
    install_factors(lm.model, factors, lm.layout)
    with torch.no_grad():
        for n in (32, 200):
            torch.testing.assert_close(other[n], lm.model(ids[:, :n]).logits, atol=2e-5, rtol=1e-4)


def test_export_never_deletes_what_it_did_not_write(tiny_model_dir, tmp_path, monkeypatch):
    lm = load_model(str(tiny_model_dir), device="cpu")
    factors = factor_set(lm.layout.pairs, lm.layout.original_length, 4 * lm.layout.original_length)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(FactorFileError, match="did not write"):
        export(lm, factors, mine)
    assert (mine / "notes.txt").read_text() == "precious" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    foreign = tmp_path / "out.partial"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(FactorFileError, match="not written by longrope export"):
        export(lm, factors, tmp_path / "out")
    assert (foreign / "keep.txt").is_file()
    monkeypatch.chdir(mine)
    for here in (".", ".."):
        with pytest.raises(FactorFileError, match="working folder"):
            export(lm, factors, here)
    assert (mine / "notes.txt").is_file()
    again = export(lm, factors, tmp_path / "again")  # a previous export is replaced
    assert export(lm, factors, again) == again and (again / "config.json").is_file()


def test_export_reads_the_recipe_model_section_original_length_included(tiny_model_dir, tmp_path):
    """Factors searched with model.original_length (e.g. Mistral's 8k) export with the same recipe: before the one
    loader, export dropped the key and refused the file as made for another model."""
    lm = load_model(str(tiny_model_dir), device="cpu", original_length=32)
    path = factor_set(lm.layout.pairs, 32, 256).save(tmp_path / "factors.json", lm.layout)
    runner = CliRunner()
    args = ["export", "--model", str(tiny_model_dir), "--factors", str(path)]
    dropped = runner.invoke(cli, [*args, "--out", str(tmp_path / "plain")])
    assert dropped.exit_code == 2 and "original_length" in dropped.output  # the file says 32, the config 64
    kept = runner.invoke(cli, [*args, "model.original_length=32", "--out", str(tmp_path / "kept")])
    assert kept.exit_code == 0, kept.output
    config = json.loads((tmp_path / "kept" / "model" / "config.json").read_text())
    assert config["original_max_position_embeddings"] == 32 and config["max_position_embeddings"] == 256

"""Factor files: round trip, validation against the model, one-line errors, the official CSV."""

from __future__ import annotations

import json
import logging
import math

import pytest

from longrope_cli.errors import FactorFileError
from longrope_cli.rope.factors import FactorSet, load_factors
from longrope_cli.rope.layout import RopeLayout

LAYOUT = RopeLayout(rotary_dim=8, rope_theta=10000.0, original_length=256, head_dim=8, name="tiny")


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_round_trip(tmp_path):
    factors = FactorSet(long_factor=(1.0, 1.2, 3.0, 8.5), start_tokens=4, attention=1.2, attention_policy="su",
                        short_factor=(1.0, 1.0, 1.05, 1.1), target_length=2048, provenance={"stage": "search"})
    path = factors.save(tmp_path / "factors.json", LAYOUT)
    data = json.loads(path.read_text())
    assert data["format"] == "longrope-factors" and data["version"] == 1
    assert data["long_factor"] == [1.0, 1.2, 3.0, 8.5] and data["scale"] == 8.0
    loaded = load_factors(path, LAYOUT, target_length=2048)
    assert loaded == factors
    assert load_factors(tmp_path, LAYOUT) == factors  # a stage folder works too
    assert not list(tmp_path.glob("*.tmp")), "atomic write leaves no temp files"


def test_wrong_pair_count(tmp_path):
    FactorSet(long_factor=(1.0,) * 4).save(tmp_path / "f.json", LAYOUT)
    other = RopeLayout(rotary_dim=16, rope_theta=10000.0, original_length=256, head_dim=16, name="big")
    data = json.loads((tmp_path / "f.json").read_text())
    data.pop("model")
    (tmp_path / "f.json").write_text(json.dumps(data))
    with pytest.raises(FactorFileError) as err:
        load_factors(tmp_path / "f.json", other)
    assert "has 4 values but model 'big' has 8 frequency pairs" in one_line(err)


def test_other_model_and_other_target(tmp_path):
    path = FactorSet(long_factor=(1.0,) * 4, target_length=2048).save(tmp_path / "f.json", LAYOUT)
    other = RopeLayout(rotary_dim=8, rope_theta=500000.0, original_length=256, head_dim=8, name="other")
    with pytest.raises(FactorFileError) as err:
        load_factors(path, other)
    assert "rope_theta" in one_line(err)
    with pytest.raises(FactorFileError) as err:
        load_factors(path, LAYOUT, target_length=4096)
    assert "made for target 2k" in one_line(err) and "--target 2k" in str(err.value)


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"short_factor": [1]}', "no 'long_factor'"),
    ('{"long_factor": []}', "non-empty list"),
    ('{"long_factor": ["a", 1, 1, 1]}', "only numbers"),
    ('{"long_factor": [1, 1, 1, -1]}', "finite positive"),
    ('{"long_factor": [1, 1, 1, 1], "version": 99}', "newer"),
])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "f.json"
    path.write_text(content)
    with pytest.raises(FactorFileError) as err:
        load_factors(path, LAYOUT)
    assert message in one_line(err)


def test_missing_file(tmp_path):
    with pytest.raises(FactorFileError, match="not found"):
        load_factors(tmp_path / "missing.json")


def test_official_csv_and_exported_config(tmp_path):
    csv = tmp_path / "result_final.csv"
    csv.write_text("1.0\n1.5\n2.25\n4.0\n")
    assert load_factors(csv, LAYOUT).long_factor == (1.0, 1.5, 2.25, 4.0)
    csv.write_text("1.0\nbanana\n")
    with pytest.raises(FactorFileError, match="not a number"):
        load_factors(csv, LAYOUT)
    config = {"rope_parameters": {"rope_type": "longrope", "long_factor": [1, 2, 3, 4], "short_factor": [1, 1, 1, 1],
                                  "attention_factor": 1.1}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_factors(tmp_path / "config.json", LAYOUT)
    assert loaded.short_factor == (1.0,) * 4 and loaded.attention == 1.1


# ---------------------------------------------------------------- attention factor of files that hold none

def su(scale: float, original: int) -> float:
    return math.sqrt(1.0 + math.log(scale) / math.log(original))


def test_csv_with_target_gets_su_attention(tmp_path, caplog):
    csv = tmp_path / "result_final.csv"
    csv.write_text("1.0\n1.5\n2.25\n4.0\n")
    with caplog.at_level(logging.INFO, logger="longrope_cli.rope.factors"):
        loaded = load_factors(csv, LAYOUT, target_length=2048)
    assert loaded.attention == pytest.approx(su(8.0, 256)) and loaded.attention_policy == "su"
    assert loaded.target_length == 2048 and loaded.long_factor == (1.0, 1.5, 2.25, 4.0)
    assert any("derived as su" in r.getMessage() for r in caplog.records)


def test_csv_without_target_warns_and_keeps_one(tmp_path, caplog):
    csv = tmp_path / "result_final.csv"
    csv.write_text("1.0\n1.5\n2.25\n4.0\n")
    with caplog.at_level(logging.WARNING, logger="longrope_cli.rope.factors"):
        loaded = load_factors(csv, LAYOUT)
    assert loaded.attention == 1.0 and loaded.target_length is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could not be derived" in m and "target" in m for m in warnings)


def test_dim_mono_n_csv(tmp_path):
    csv = tmp_path / "result_final.csv"
    csv.write_text("4.0\n1.0\n1.5\n2.25\n4.0\n")  # n-hat, then d/2 factors
    loaded = load_factors(csv, LAYOUT, target_length=2048)
    assert loaded.start_tokens == 4 and loaded.long_factor == (1.0, 1.5, 2.25, 4.0)
    assert loaded.attention == pytest.approx(su(8.0, 256))
    csv.write_text("0\n1.0\n1.5\n2.25\n4.0\n")
    assert load_factors(csv, LAYOUT).start_tokens == 0
    csv.write_text("1.5\n1.0\n1.5\n2.25\n4.0\n")  # first value not an integer: not n-hat, so 5 factors
    with pytest.raises(FactorFileError) as err:
        load_factors(csv, LAYOUT)
    assert "has 5 values" in one_line(err)


def phi3_config(**rope_extra):
    """A Phi-3-mini-128k-style config.json (rope_scaling without attention_factor), at LAYOUT's size."""
    return {"model_type": "phi3", "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
            "rope_theta": 10000.0,
            "rope_scaling": {"type": "longrope", "long_factor": [1.0, 1.2, 3.0, 8.5],
                             "short_factor": [1.0, 1.0, 1.05, 1.1], **rope_extra}}


PHI3_LAYOUT = RopeLayout(rotary_dim=8, rope_theta=10000.0, original_length=4096, head_dim=8, name="phi3ish")


def test_phi3_config_without_attention_factor_gets_su(tmp_path, caplog):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(phi3_config()))
    with caplog.at_level(logging.INFO, logger="longrope_cli.rope.factors"):
        loaded = load_factors(path, PHI3_LAYOUT, target_length=131072)
    expected = math.sqrt(1 + math.log(32) / math.log(4096))
    assert expected == pytest.approx(1.1902, abs=1e-4)
    assert loaded.attention == pytest.approx(expected) and loaded.attention_policy == "su"
    assert loaded.target_length == 131072 and loaded.short_factor == (1.0, 1.0, 1.05, 1.1)
    assert any("derived as su" in r.getMessage() for r in caplog.records)
    # rope_parameters (transformers v5 spelling), `factor` instead of max_position_embeddings
    config = phi3_config()
    config.pop("max_position_embeddings")
    config["rope_parameters"] = {**config.pop("rope_scaling"), "rope_type": "longrope", "factor": 32.0}
    path.write_text(json.dumps(config))
    loaded = load_factors(path, PHI3_LAYOUT)
    assert loaded.attention == pytest.approx(expected) and loaded.target_length == 131072
    with pytest.raises(FactorFileError) as err:  # the derived target is checked like any other
        load_factors(path, PHI3_LAYOUT, target_length=65536)
    assert "made for target 128k" in one_line(err)
    with pytest.raises(FactorFileError) as err:  # and the config's original window against the model
        load_factors(path, LAYOUT)
    assert "original_length" in one_line(err)


def test_transformers_agrees_on_derived_attention(tmp_path):
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    data = {**phi3_config(), "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    _, theirs = ROPE_INIT_FUNCTIONS["longrope"](Phi3Config(**data), "cpu")
    assert load_factors(path, PHI3_LAYOUT).attention == pytest.approx(theirs)


def test_config_with_attention_factor_keeps_it(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(phi3_config(attention_factor=1.05)))
    loaded = load_factors(path, PHI3_LAYOUT)
    assert loaded.attention == 1.05 and loaded.attention_policy != "su" and loaded.target_length == 131072


@pytest.mark.parametrize(("long_factor", "why"), [((1.0, 3.0, 2.0, 4.0), "decreases at pair 2"),
                                                  ((0.5, 1.0, 2.0, 4.0), "< 1")])
def test_factors_outside_the_papers_space_load_with_a_warning(long_factor, why, tmp_path, caplog):
    path = FactorSet(long_factor=long_factor, target_length=1024).save(tmp_path / "odd.json", LAYOUT)
    with caplog.at_level(logging.WARNING):
        loaded = load_factors(path, LAYOUT)
        load_factors(path, LAYOUT)  # once per file
    assert loaded.long_factor == long_factor  # used as given: research files may do this on purpose
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and why in warnings[0] and "using it as given" in warnings[0]
    caplog.clear()
    fine = FactorSet(long_factor=(1.0, 2.0, 2.0, 4.0), target_length=1024).save(tmp_path / "fine.json", LAYOUT)
    with caplog.at_level(logging.WARNING):
        load_factors(fine, LAYOUT)
    assert not caplog.records

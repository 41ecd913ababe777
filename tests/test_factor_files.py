"""Factor files: round trip, validation against the model, one-line errors, the official CSV."""

from __future__ import annotations

import json

import pytest

from longrope_cli.errors import FactorFileError
from longrope_cli.rope.baselines import yarn_factors
from longrope_cli.rope.factors import FactorSet, load_factors, relative_to_absolute
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


def test_relative_search_is_multiplicative():
    base = yarn_factors(LAYOUT, 2048)
    relative = FactorSet(long_factor=(1.0, 2.0, 2.0, 2.0))
    absolute = relative_to_absolute(relative, base)
    assert absolute.long_factor == tuple(r * b for r, b in zip(relative.long_factor, base.long_factor, strict=True))

"""A golden seeded search through the CLI, pinned the way torchtune pins its losses.

`longrope search` on the bundled test bed (its weights, tokenizer and corpus are files in the package, so the
numbers do not move with transformers' random initialisation the way the tiny fixture model's would), at 2x its
window with a fixed seed and the small sizes of conftest.SMALL_SEARCH: the seed perplexities (the scorer alone),
the number of evaluations, the factors and n-hat the evolution ends with, the temperature the attention search
picks and the best perplexity are pinned. A change to the scorer, the operators, the RNG stream, the selection
or the budget accounting moves at least one of them.

If a change is meant to move them: rerun with `-s`, check that the new numbers are no worse, and update GOLDEN
(the failure message prints the new values).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import SMALL_SEARCH, requires_testbed, small_search

SEED = 7
TARGET = 512  # 2x the test bed's 256-token window: one candidate scores in ~0.1 s
GOLDEN = {
    "evaluations": 8 + 3 * 6,  # conftest.SMALL_SEARCH with 3 generations (the attention search is not counted)
    "stopped": "iterations",
    "seed_perplexity": {"pi": 56.073376947914575, "ntk": 48.80216235205507, "yarn": 47.401881775699614},
    "fitness_perplexity": 47.3134646985472,  # the evolution's best; YaRN's 47.4019 beaten
    "long_factor": [1.0, 1.04, 1.08, 1.13, 1.18, 1.24, 1.26, 1.37, 1.47, 1.53, 1.62, 1.73, 1.86, 1.92, 1.92, 1.92,
                    1.92, 1.92, 1.92, 1.92, 1.92, 1.92, 1.92, 1.93, 1.93, 1.93, 1.98, 1.99, 1.99, 1.99, 1.99, 1.99],
    "start_tokens": 0,
    "attention": 1.0287,  # the attention search's pick (su at 2x: 1.0607)
    "attention_search_perplexity": 47.225201261284965,
}
REL = 1e-5  # CPU float32 noise is ~1e-7 relative; a real change to the search moves the numbers far more


def run_golden(out) -> tuple[subprocess.CompletedProcess, dict]:
    command = [sys.executable, "-m", "longrope_cli", "search", "--model", "testbed", "--device", "cpu",
               "--target", str(TARGET), "--out", str(out), "--no-progress", *small_search(iterations=3),
               f"search.seed={SEED}", "search.attention_search_evals=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done, json.loads((out / "factors.json").read_text())


@pytest.mark.integration
@requires_testbed
def test_golden_seeded_search_on_the_test_bed(tmp_path):
    assert SMALL_SEARCH["population"] + 3 * (SMALL_SEARCH["mutations"] + SMALL_SEARCH["crossovers"]) == \
        GOLDEN["evaluations"], "conftest.SMALL_SEARCH changed: rerun and update GOLDEN"
    done, factors = run_golden(tmp_path / "golden")
    prov = factors["provenance"]
    got = {
        "evaluations": prov["evaluations"],
        "stopped": prov["stopped"],
        "fitness_perplexity": prov["fitness_perplexity"],
        "perplexity": prov["perplexity"],
        "attention_search_perplexity": prov["attention_search"]["perplexity"],
        "refine_evaluations": prov["refine_evaluations"],
        "attention": factors["attention"]["factor"],
        "start_tokens": factors["start_tokens"],
        "long_factor": factors["long_factor"],
        "seed_perplexity": prov["seed_perplexity"],
    }
    message = f"the golden search moved; if that is intended, update GOLDEN to:\n{json.dumps(got, indent=1)}"
    # the CLI reports what factors.json holds: the handed-on factors' score, with the tuned temperature
    line = re.search(r"best perplexity ([\d.]+) after (\d+) evaluations \(\+(\d+) refining\) \((\w+)\)",
                     done.stdout)
    assert line, done.stdout
    assert float(line.group(1)) == pytest.approx(got["perplexity"], abs=5e-5)
    assert (int(line.group(2)), int(line.group(3)), line.group(4)) == (got["evaluations"], got["refine_evaluations"],
                                                                       got["stopped"])
    assert got["perplexity"] == got["attention_search_perplexity"] and got["refine_evaluations"] == 4
    # the scorer alone, before any evolution
    assert got["seed_perplexity"] == pytest.approx(GOLDEN["seed_perplexity"], rel=REL), message
    assert (got["evaluations"], got["stopped"]) == (GOLDEN["evaluations"], GOLDEN["stopped"]), message
    assert got["long_factor"] == GOLDEN["long_factor"], message  # grid values: exact
    assert got["start_tokens"] == GOLDEN["start_tokens"], message
    assert got["fitness_perplexity"] == pytest.approx(GOLDEN["fitness_perplexity"], rel=REL), message
    assert got["attention"] == pytest.approx(GOLDEN["attention"], rel=REL), message
    assert got["attention_search_perplexity"] == pytest.approx(GOLDEN["attention_search_perplexity"], rel=REL), \
        message
    # the search is the best it scored: no logged candidate beats the reported one
    log = [json.loads(row) for row in (tmp_path / "golden" / "candidates.jsonl").read_text().splitlines()]
    assert len(log) == got["evaluations"]
    assert min(float(r["perplexity"]) for r in log) == pytest.approx(got["fitness_perplexity"], rel=1e-12)

"""bench/chomsky.py: a dry run of the grid (a few steps) writes results with their provenance and
resumes without redoing the cells it holds."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import chomsky  # noqa: E402


def test_dry_run_writes_scaled_accuracy_per_cell_with_provenance_and_resumes(tmp_path, capsys):
    argv = ["--quick", "--out", str(tmp_path), "--tasks", "parity-check,s3", "--variants", "diagonal,lti",
            "--width", "32"]
    chomsky.main(argv)
    data = json.loads((tmp_path / "chomsky_quick.json").read_text())
    assert data["setup"]["train_lengths"] == [3, 8] and data["setup"]["test_buckets"] == [8, 12, 16]
    assert [(c["task"], c["variant"]) for c in data["cells"]] == [("parity-check", "diagonal"), ("parity-check", "lti"),
                                                                  ("s3", "diagonal"), ("s3", "lti")]
    cell = data["cells"][0]
    assert set(cell["scaled"]) == {"8-12", "12-16"} and cell["chance"] == 0.5 and cell["hidden_dim"] == 32
    assert cell["config"]["hidden_dim"] == 32 and cell["code_version"] == data["provenance"]["code_version"]
    assert data["provenance"]["git"]["commit"] and data["provenance"]["seeds"] == [0]
    md = (tmp_path / "chomsky_quick.md").read_text()
    assert "**s3** (6 classes, chance 0.167)" in md and "| diagonal | 2 x 32 |" in md and "Produced by" in md
    accuracy = 100 * data["cells"][0]["accuracy"]["8-12"]
    assert "| acc. @ 8-12 | acc. @ 12-16 |" in md and f"| diagonal | {accuracy:.1f}% |" in md
    capsys.readouterr()
    chomsky.main(argv)
    assert "4 runs already in" in capsys.readouterr().out.splitlines()[0]
    assert len(json.loads((tmp_path / "chomsky_quick.json").read_text())["cells"]) == 4


def test_a_protocol_it_cannot_run_stops_the_grid_before_any_cell(tmp_path):
    with pytest.raises(SystemExit, match="--test-buckets 16,8: need at least two increasing lengths"):
        chomsky.main(["--quick", "--out", str(tmp_path), "--test-buckets", "16,8"])
    assert not (tmp_path / "chomsky_quick.json").exists()


def test_overrides_and_a_curriculum_reach_every_cell_and_its_record(tmp_path):
    chomsky.main(["--quick", "--out", str(tmp_path), "--tasks", "s3", "--variants", "householder", "--width", "32",
                  "--set", "reflection_range=closed", "--set", "low_rank_rank=3", "--curriculum", "0.5"])
    data = json.loads((tmp_path / "chomsky_quick.json").read_text())
    assert data["setup"]["overrides"] == {"reflection_range": "closed", "low_rank_rank": 3}
    assert data["setup"]["curriculum"] == 0.5
    config = data["cells"][0]["config"]
    assert config["reflection_range"] == "closed" and config["low_rank_rank"] == 3
    md = (tmp_path / "chomsky_quick.md").read_text()
    assert "reflection_range = closed" in md and "growing from 3 to 8 over the first 50% of the steps" in md
    with pytest.raises(SystemExit):
        chomsky.parse_args(["--set", "no_such_key=1"])

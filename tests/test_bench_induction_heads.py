"""bench/induction_heads.py: every variant at every learning rate over every seed, in one results file
that names what produced it."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import induction_heads  # noqa: E402


def test_every_learning_rate_and_seed_is_a_row_with_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["induction_heads.py", "--variants", "diagonal", "--seeds", "3,4",
                                      "--lrs", "6e-3,3e-3", "--steps", "2", "--length", "8",
                                      "--test-lengths", "8,16", "--out", str(tmp_path), "--name", "ih"])
    induction_heads.main()
    results = json.loads((tmp_path / "ih.json").read_text())
    assert [(r["variant"], r["lr"]) for r in results["rows"]] == [("diagonal", 6e-3), ("diagonal", 3e-3)]
    assert all([run["seed"] for run in r["runs"]] == [3, 4] for r in results["rows"])
    assert set(results["rows"][0]["mean_accuracy"]) == {"8", "16"}
    assert results["rows"][0]["config"]["vocab_size"] == 16 and results["provenance"]["seeds"] == [3, 4]
    md = (tmp_path / "ih.md").read_text()
    assert "| diagonal | 0.006 |" in md and "| diagonal | 0.003 |" in md and "seeds 3, 4" in md

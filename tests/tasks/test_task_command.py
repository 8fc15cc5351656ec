"""`main.py evaluate --task selective-copying | induction-heads` through the CLI (in this process):
the flags reach the runs, the table is printed and the JSON and Markdown files are written."""

import json

import pytest

from sparse_ssm import cli
from sparse_ssm.tasks.training import VARIANTS, run_task, task_model_config


def test_selective_copying_through_the_cli(tmp_path, capsys):
    code = cli.main(["evaluate", "--task", "selective-copying", "--variants", "diagonal,lti", "--steps", "3",
                     "--batch-size", "4", "--length", "12", "--test-lengths", "12,20", "--num-memorize", "2",
                     "--seed", "1", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads((tmp_path / "selective-copying.json").read_text())
    assert (data["task"], data["steps"], data["train_length"]) == ("selective-copying", 3, 12)
    assert data["chance"] == pytest.approx(1 / 13)
    assert [row["variant"] for row in data["rows"]] == ["diagonal", "lti"]
    for row in data["rows"]:                      # the run each variant gets from these flags
        expected = run_task("selective-copying", task_model_config(row["variant"], 20 + 64), steps=3, batch=4,
                            length=12, test_lengths=[12, 20], seed=1, num_memorize=2)
        assert row["loss"] == expected.final_loss
        assert row["accuracy"] == {str(L): a for L, a in expected.accuracy.items()}
    table = (tmp_path / "selective-copying.md").read_text()
    assert table.startswith("| variant | acc. @ 12 | acc. @ 20 |") and table in out
    assert "chance: 7.7%; 3 steps, batch 4, lr 0.003, train length 12" in table


def test_induction_heads_through_the_cli(tmp_path, capsys):
    code = cli.main(["evaluate", "--task", "induction-heads", "--variants", "block", "--steps", "2", "--batch-size",
                     "4", "--length", "16", "--lr", "6e-3", "--seed", "2", "--output-dir", str(tmp_path)])
    assert code == 0 and "induction-heads, block: 2 steps at length 16" in capsys.readouterr().out
    data = json.loads((tmp_path / "induction-heads.json").read_text())
    (row,) = data["rows"]
    expected = run_task("induction-heads", task_model_config("block", 16 + 64), steps=2, batch=4, length=16,
                        test_lengths=[16], seed=2, lr=6e-3)
    assert data["lr"] == 6e-3
    assert row["variant"] == "block" and row["loss"] == expected.final_loss
    assert row["accuracy"] == {"16": expected.accuracy[16]}


def test_an_unknown_variant_is_named(tmp_path, capsys):
    assert cli.main(["evaluate", "--task", "induction-heads", "--variants", "diagonal,sparse9",
                     "--output-dir", str(tmp_path)]) == 2
    assert f"--variants: unknown variant 'sparse9'; choose from {', '.join(VARIANTS)}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())

"""`evaluate`: invalid values are refused with the flag named, before a model loads or trains."""

import shutil

import pytest

from helpers import FIXTURES, make_text
from sparse_ssm import cli


@pytest.fixture
def model_dir(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "checkpoint_v0", run / "checkpoints" / "step-00000002")
    (run / "latest").symlink_to("checkpoints/step-00000002")
    (tmp_path / "eval.txt").write_text(make_text(20))
    return run


@pytest.mark.parametrize("flag, value, message", [("--stride", "0", "argument --stride: must be >= 1, got 0"),
                                                  ("--max-seq-len", "1", "argument --max-seq-len: must be >= 2"),
                                                  ("--batch-size", "x", "argument --batch-size: expected an integer"),
                                                  ("--steps", "-5", "argument --steps: must be >= 1"),
                                                  ("--lr", "0", "argument --lr: must be > 0, got 0"),
                                                  ("--lr", "fast", "argument --lr: expected a number, got 'fast'")])
def test_invalid_numbers_are_refused_by_the_parser(model_dir, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["evaluate", "--model-dir", str(model_dir), "--data", str(model_dir.parent / "eval.txt"), flag, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_stride_longer_than_the_window_is_refused_and_a_valid_one_is_used(model_dir, capsys):
    args = ["evaluate", "--model-dir", str(model_dir), "--data", str(model_dir.parent / "eval.txt")]
    assert cli.main([*args, "--stride", "17"]) == 2
    assert "--stride: must be at most the window of 16 tokens" in capsys.readouterr().err
    assert cli.main([*args, "--stride", "3"]) == 0
    assert "(window 16, stride 3," in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--variants", "diagonal,nope"], "--variants: unknown variant 'nope'; choose from diagonal"),
    (["--test-lengths", "32,abc"], "argument --test-lengths: expected a comma list of integers, got '32,abc'"),
    (["--test-lengths", "64,2"], "argument --test-lengths: must be >= 3, got 2"),
    (["--num-memorize", "40"], "--num-memorize: the 40 tokens to copy must fit the sequence"),
    (["--test-lengths", "64,8", "--num-memorize", "10"], "at most --length and every --test-lengths (8)"),
])
def test_task_inputs_are_checked_before_any_variant_trains(monkeypatch, capsys, args, message):
    def run_task(*_, **__):
        raise AssertionError("a variant trained before the inputs were checked")
    monkeypatch.setattr("sparse_ssm.tasks.training.run_task", run_task)
    try:
        code = cli.main(["evaluate", "--task", "selective-copying", *args])
    except SystemExit as parser_exit:           # (argparse refuses malformed values itself)
        code = parser_exit.code
    assert code == 2 and message in capsys.readouterr().err


def test_a_missing_or_empty_data_file_is_refused_with_the_fix(model_dir, capsys):
    args = ["evaluate", "--model-dir", str(model_dir), "--data"]
    assert cli.main([*args, str(model_dir.parent / "nothere.txt")]) == 2
    err = capsys.readouterr().err
    assert "evaluation data" in err and "does not exist; pass an existing file with --data" in err
    (model_dir.parent / "empty.txt").write_text("\n\n")
    assert cli.main([*args, str(model_dir.parent / "empty.txt")]) == 2
    assert "no non-empty documents" in (err := capsys.readouterr().err) and "pass a file with text in it" in err

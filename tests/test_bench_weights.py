"""bench/weights.py scores a checkpoint that it trained itself, and records the command, config and
commit that made it, so its quality figures can be reproduced from the repository."""

import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import weights  # noqa: E402
from helpers import make_text, tiny_config  # noqa: E402


def test_a_checkpoint_without_a_training_record_is_refused_with_the_command_that_makes_one(tmp_path):
    (tmp_path / "best").mkdir()                      # a checkpoint from elsewhere: no record of how it was made
    with pytest.raises(SystemExit, match=r"--train config/demo\.yaml"):
        weights.training_record(tmp_path)


@pytest.mark.slow
def test_training_records_the_command_the_resolved_config_and_the_commit(tmp_path):
    data = tmp_path / "text"
    data.mkdir()
    (data / "a.txt").write_text(make_text(600))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(data, tmp_path / "unused", training={"max_steps": 3}).to_dict()))
    record = weights.train_checkpoint(config, tmp_path / "run")
    assert weights.training_record(tmp_path / "run") == record           # what the quality part reads back
    assert record["command"] == ["python", "main.py", "train", "--config", str(config), "--output-dir",
                                 str(tmp_path / "run"), "--use-best-model"]
    assert record["config"]["model"]["hidden_dim"] == 32 and record["config"]["training"]["max_steps"] == 3
    assert len(record["git"]["commit"]) == 40 and record["code_version"].startswith(record["git"]["commit"])
    assert record["versions"]["torch"]

"""The commands that write one file (generate --output-file, evaluate --output-file, the tasks'
--output-dir files, create-synthetic's distillation files, the corpus unpacker) never replace a
file they did not write without --overwrite, and never their own input, even with it."""

import pytest

from helpers import tiny_language_model, write_checkpoint
from sparse_ssm import cli
from sparse_ssm.data.corpus import ensure_shakespeare
from sparse_ssm.teacher.config import SyntheticConfig
from sparse_ssm.teacher.synthetic import check_inputs
from sparse_ssm.util.errors import OutputError, SyntheticError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outputs") / "run"
    write_checkpoint(folder / "best", *tiny_language_model(seed=3, max_seq_len=1024))
    return folder


def test_generate_replaces_an_existing_file_only_with_overwrite_and_never_its_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "mine.txt"
    out.write_text("mine")
    generate = ["generate", "--model-dir", str(run), "--prompt", "The sun", "--max-length", "2", "--no-stream"]
    assert cli.main([*generate, "--output-file", str(out)]) == 2
    assert f"--output-file {out} already exists: pass --overwrite to replace it" in capsys.readouterr().err
    assert out.read_text() == "mine"
    assert cli.main([*generate, "--output-file", str(out), "--overwrite"]) == 0
    assert out.read_text().startswith("The sun")
    config = run / "best" / "config.yaml"
    before = config.read_bytes()
    assert cli.main([*generate, "--output-file", str(config), "--overwrite"]) == 2
    assert "would overwrite the command's own input" in capsys.readouterr().err
    assert config.read_bytes() == before


def test_evaluate_never_replaces_its_data_and_the_tasks_check_their_files_first(run, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("The sun rose slowly over the hills. " * 20)
    assert cli.main(["evaluate", "--model-dir", str(run), "--data", str(data), "--output-file", str(data),
                     "--overwrite"]) == 2
    assert f"--output-file {data}: it would overwrite the command's own input" in capsys.readouterr().err
    (tmp_path / "parity.json").write_text("mine")
    assert cli.main(["evaluate", "--task", "parity", "--variants", "diagonal", "--steps", "1",
                     "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr()
    assert "parity.json already exists: pass --overwrite" in err.err and "steps at length" not in err.out
    assert (tmp_path / "parity.json").read_text() == "mine"


def test_create_synthetic_never_replaces_distillation_files_it_did_not_write(tmp_path):
    cfg = SyntheticConfig(output_dir=str(tmp_path), output_file="d.json", distillation=True)
    (tmp_path / "d.teacher.safetensors").write_bytes(b"mine")
    with pytest.raises(SyntheticError, match="d.teacher.safetensors already exists: pass --overwrite"):
        check_inputs(cfg)
    check_inputs(cfg, overwrite=True)
    prompts = tmp_path / "d.json"
    prompts.write_text("Tell me a story\n")
    with pytest.raises(SyntheticError, match="is the prompts file this run reads"):
        check_inputs(cfg.model_copy(update={"prompts_file": str(prompts)}), overwrite=True)


def test_the_corpus_is_never_unpacked_over_another_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="is not the embedded corpus.*new or empty folder"):
        ensure_shakespeare(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]

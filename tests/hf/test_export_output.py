"""`export` never deletes a user's work: the output may not overlap the model directory it reads
(not even with --overwrite), a file is never replaced by a folder, a folder with other files is
written only with --overwrite (and then only the export's own files are replaced), and an earlier
export's folder is replaced with its stale files gone."""

import json

import pytest

from helpers import dead_pid, tiny_language_model, write_checkpoint
from sparse_ssm import cli

MODEL_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A training output directory with a best/ checkpoint, and a snapshot of its files."""
    folder = tmp_path_factory.mktemp("export") / "run"
    write_checkpoint(folder / "best", *tiny_language_model(seed=2))
    (folder / "checkpoints").mkdir()
    return folder


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def export(run, output, *flags):
    return cli.main(["export", "--model-dir", str(run), "--output", str(output), *flags])


def test_an_output_overlapping_the_model_dir_is_refused_even_with_overwrite(run, capsys):
    before = snapshot(run)
    for output in (run, run / "checkpoints", run / "best", run / "hf", run.parent):
        for flags in ((), ("--overwrite",)):
            assert export(run, output, *flags) == 2, output
            err = capsys.readouterr().err
            assert f"--output {output} overlaps the model directory {run}, which export reads" in err
    assert snapshot(run) == before


def test_a_file_or_a_folder_with_other_files_is_refused_and_overwrite_keeps_the_others(run, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert export(run, tmp_path / "file", "--overwrite") == 2
    assert "is a file; an export is a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert export(run, other) == 2
    assert "holds files an export did not write (notes.txt): pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    assert export(run, other, "--overwrite") == 0
    assert (other / "notes.txt").read_text() == "mine" and MODEL_FILES <= {p.name for p in other.iterdir()}


def test_an_earlier_export_is_replaced_without_its_stale_files_or_a_killed_exports_temporary(run, tmp_path):
    out = tmp_path / "hf"
    assert export(run, out) == 0
    (out / "model.safetensors").rename(out / "model-00001-of-00002.safetensors")   # as if the earlier one had shards
    marker = json.loads((out / ".sparse-ssm-output.json").read_text())
    marker["files"].append("model-00001-of-00002.safetensors")
    (out / ".sparse-ssm-output.json").write_text(json.dumps(marker))
    (tmp_path / f".hf.tmp{dead_pid()}").mkdir()                   # a killed export's temporary
    assert export(run, out) == 0
    names = {p.name for p in out.iterdir()}
    assert MODEL_FILES <= names and "model-00001-of-00002.safetensors" not in names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]               # no temporary left

"""A training run never deletes a user's work: a fresh run into a folder with a run's checkpoints or
other files is refused (--resume continues it, --overwrite replaces only a run's entries), a tokenizer
left in the output folder is reused only on resume, and a killed run's temporaries are cleaned up
(best/ caught between its two renames restored) when the next run takes the folder."""

import json
import os
import shutil

import pytest

from helpers import dead_pid, tiny_language_model
from sparse_ssm import cli
from sparse_ssm.data.tokenizer import save_tokenizer
from sparse_ssm.model.checkpoint import resolve_checkpoint
from sparse_ssm.train import Trainer
from sparse_ssm.util.errors import CheckpointError, OutputError
from sparse_ssm.util.files import write_marker
from sparse_ssm.util.lock import LOCK_FILE

quiet = dict(log=lambda *_: None)


@pytest.fixture
def finished_run(tiny, tmp_path):
    """A finished 3-step run (checkpoints step-3, best/) in tmp_path/out, and its bytes."""
    out = tmp_path / "out"
    Trainer(tiny(out, training={"max_steps": 3}), **quiet).train()
    return out, {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_fresh_run_into_a_finished_run_is_refused_and_changes_nothing(tiny, finished_run, tmp_path, capsys):
    out, before = finished_run
    config = tmp_path / "c.yaml"
    tiny(out, training={"max_steps": 2}).save(config)
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a training run (checkpoints step-3, best/): pass --resume to continue it, " \
           f"--overwrite to replace it, or another --output-dir" in err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert not (out / LOCK_FILE).exists()                         # released on refusal


def test_overwrite_replaces_only_a_runs_entries_and_resume_with_it_is_refused(tiny, finished_run, tmp_path, capsys):
    out, _ = finished_run
    (out / "notes.txt").write_text("mine")
    config = tmp_path / "c.yaml"
    tiny(out, training={"max_steps": 2}).save(config)
    assert cli.main(["train", "--config", str(config), "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite: give one" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(config), "--overwrite"]) == 0
    assert "--overwrite: removed the earlier run's checkpoints, best, latest" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert json.loads((out / "best" / "metrics.json").read_text())["step"] == 2      # the new run's best/
    assert (out / "notes.txt").read_text() == "mine"


def test_a_folder_with_other_files_is_refused_and_overwrite_never_removes_an_input(tiny, corpus, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match=r"mine is not empty \(thesis.tex\) and was not made by a training run: "
                                          r"pass --overwrite"):
        Trainer(tiny(out), **quiet)
    with pytest.raises(OutputError, match="is inside dataset.data_path"):
        Trainer(tiny(corpus / "run"), **quiet)                    # never into the folder of its data
    mixed = tmp_path / "mixed"
    (mixed / "checkpoints").mkdir(parents=True)
    shutil.copy(next(corpus.iterdir()), mixed / "checkpoints" / "data.txt")
    with pytest.raises(OutputError, match="--overwrite would remove .*checkpoints, which holds this run's "
                                          "dataset.data_path"):
        Trainer(tiny(mixed, dataset={"data_path": str(mixed / "checkpoints")}), overwrite=True, **quiet)
    assert (mixed / "checkpoints" / "data.txt").is_file() and (out / "thesis.tex").is_file()


def test_a_fresh_run_never_reuses_a_tokenizer_left_in_its_folder(corpus, tmp_path):
    from helpers import tiny_config

    out = tmp_path / "out"
    out.mkdir()
    _, old = tiny_language_model(vocab=280)                       # another text, another size
    save_tokenizer(old, out / "tokenizer.json")
    write_marker(out, "train", [])                                # a run's folder without checkpoints
    config = tiny_config(corpus, out, model={"vocab_size": 400}, training={"max_steps": 1})
    trainer = Trainer(config, **quiet)
    trainer.close()
    assert trainer.data.vocab_size != old.get_vocab_size()
    assert trainer.data.tokenizer.to_str() != old.to_str()
    assert config.model.vocab_size == trainer.data.vocab_size


def test_a_killed_runs_temporaries_are_removed_and_its_best_restored(tiny, finished_run, capsys):
    out, before = finished_run
    pid = dead_pid()
    step = out / "checkpoints" / f".step-00000004.tmp{pid}"
    shutil.copytree(out / "checkpoints" / "step-00000003", step)           # killed while writing step 4
    (out / "best").rename(out / f".best.old{pid}")                         # killed between best/'s renames
    shutil.copytree(out / "checkpoints" / "step-00000003", out / f".best.tmp{pid}")
    live = out / f".metrics.json.tmp{os.getppid()}"                        # a process that still runs
    live.write_text("being written")
    with pytest.raises(CheckpointError, match=rf"previous one is .*\.best\.old{pid}; continue the run"):
        resolve_checkpoint(out, "best")
    assert cli.main(["evaluate", "--model-dir", str(out), "--checkpoint", "best", "--data", str(out)]) == 2
    assert f".best.old{pid}" in capsys.readouterr().err
    notes = []
    Trainer(tiny(out), resume="latest", log=notes.append).close()
    kept = lambda files: {p: b for p, b in files.items() if p.relative_to(out).parts[0] in ("checkpoints", "best")}
    assert kept({p: p.read_bytes() for p in out.rglob("*") if p.is_file()}) == kept(before)
    assert [p for p in out.rglob(".*") if ".tmp" in p.name or ".old" in p.name] == [live]
    assert any(f"restored {out / 'best'}" in n for n in notes) and any(str(step) in n for n in notes)


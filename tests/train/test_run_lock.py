"""One writer per output directory: a lock file that names its owner, refused to a second
process, released on exit, taken over when its process is gone."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from helpers import ROOT, dead_pid, tiny_config, wait_for_line
from sparse_ssm import cli
from sparse_ssm.train import Trainer
from sparse_ssm.util.errors import DataError, DirectoryLockedError
from sparse_ssm.util.lock import LOCK_FILE, DirectoryLock, Owner


@pytest.mark.slow
def test_a_second_run_into_the_same_directory_is_refused_and_the_first_releases_it(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    tiny_config(corpus, out, training={"max_steps": 100000, "num_epochs": 1000, "save_steps": 100000,
                                       "eval_steps": 100000}).save(tmp_path / "c.yaml")
    first = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "train", "--config", str(tmp_path / "c.yaml")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                             env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    try:
        wait_for_line(first.stdout, "unigram validation perplexity")   # training starts: its files are written
        owner = json.loads((out / LOCK_FILE).read_text())
        assert owner["pid"] == first.pid and owner["host"] == socket.gethostname() and "train" in owner["command"]
        written = {p: p.read_bytes() for p in (out / "config.yaml", out / "tokenizer.json")}
        # the second run: this process (another pid than the first's)
        assert cli.main(["train", "--config", str(tmp_path / "c.yaml"), "--seed", "8", "--set",
                         "training.max_steps=2"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another run (pid {first.pid} on host {socket.gethostname()}, since" in err
        assert "choose another output directory" in err
        assert {p: p.read_bytes() for p in written} == written and not (out / "checkpoints").exists()
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=180)
    assert first.returncode == 130, err[-2000:]
    assert not (out / LOCK_FILE).exists()                      # released on SIGTERM: --resume may continue it
    assert "checkpoint saved" in err                           # (test_cli_train_resume_and_best_model resumes)


def test_a_stale_lock_is_taken_over_with_a_note_and_released(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "process_start": None,
                                             "since": "2020-01-01T00:00:00+00:00", "command": "main.py train",
                                             "token": "x"}))
    notes = []
    with Trainer(tiny(out, training={"max_steps": 1}), log=notes.append) as trainer:
        assert Owner.read(out / LOCK_FILE).pid == os.getpid()
        trainer.train()
    assert any("was left by a run that is no longer running" in n and "since 2020-01-01" in n for n in notes)
    assert not (out / LOCK_FILE).exists()


def test_a_lock_of_another_host_or_a_live_process_is_never_taken(tmp_path):
    for owner in ({"pid": dead_pid(), "host": "elsewhere.example"}, {"pid": os.getppid(), "host": socket.gethostname()}):
        (tmp_path / LOCK_FILE).write_text(json.dumps({**owner, "process_start": None, "since": "2020-01-01T00:00:00",
                                                      "command": "main.py train", "token": "y"}))
        with pytest.raises(DirectoryLockedError, match=f"pid {owner['pid']} on host {owner['host']}, since 2020"):
            DirectoryLock.acquire(tmp_path, "test")
    (tmp_path / LOCK_FILE).write_text("")                      # being written, or damaged
    with pytest.raises(DirectoryLockedError, match="being written or is damaged.*delete"):
        DirectoryLock.acquire(tmp_path, "test")


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                  "process_start": "1", "since": "2020-01-01T00:00:00",
                                                  "command": "main.py train", "token": "z"}))
    lock = DirectoryLock.acquire(tmp_path, "test", log=lambda *_: None)   # the parent did not start at tick 1
    assert Owner.read(tmp_path / LOCK_FILE).pid == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_is_released_when_the_trainer_fails(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError):
        Trainer(tiny_config(tmp_path / "missing", out), log=lambda *_: None)
    assert out.is_dir() and not (out / LOCK_FILE).exists()
    first = DirectoryLock.acquire(out, "a")
    second = DirectoryLock.acquire(out, "b")                  # the same process may hold it twice
    first.release()
    first.release()                                           # (once per hold)
    assert (out / LOCK_FILE).exists()
    second.release()
    assert not (out / LOCK_FILE).exists()

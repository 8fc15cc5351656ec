"""The device-resident decode loop (the path on CUDA), forced on the CPU: the same tokens as the
host loop for a seed, every sampling setting, end-of-text and stop rules mid-block, and the tokens
reach the host once per block instead of once per token."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM
from sparse_ssm.generate import GenerationConfig, stream_generate
from sparse_ssm.generate.stream import DEVICE_BLOCK

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
SETTINGS = [dict(temperature=0.0), dict(temperature=0.9, top_k=20, seed=5),
            dict(temperature=1.0, top_p=0.9, repetition_penalty=1.3, seed=7),
            dict(temperature=1.5, top_k=5, top_p=0.8, seed=0)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = SparseSSMConfig(vocab_size=50, hidden_dim=32, state_dim=8, ffn_dim=0, num_layers=2, dropout=0.0,
                          num_heads=2, selective_param_class="sparse", sparsity_level=0.5)
    return SparseSSMForCausalLM(cfg).double().eval()


def steps(model, settings, on_device, **kw):
    out = stream_generate(model, PROMPTS, GenerationConfig(max_length=2 * DEVICE_BLOCK + 5, **settings),
                          on_device=on_device, **kw)
    return [(s.tokens.tolist(), s.finished.tolist()) for s in out]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_device_loop_gives_the_host_loops_tokens(model, settings):
    host = steps(model, settings, on_device=False)
    assert steps(model, settings, on_device=True) == host
    if settings["temperature"]:
        assert len({tuple(t) for t, _ in host}) > 1                   # a sampled stream, not a constant


@pytest.mark.parametrize("settings", SETTINGS[:2], ids=["greedy", "sampled"])
def test_end_of_text_and_stop_rules_mid_block(model, settings):
    """Row 0 ends at a token of its own stream (end-of-text), row 1 by `stop` after 5 tokens, inside
    the first block; row 2 runs on.  The device loop reports the same steps."""
    free = steps(model, settings, on_device=False)
    eos = free[3][0][0]
    stop = lambda i, ids: i == 1 and len(ids) == 5
    host = steps(model, settings, False, eos_token_id=eos, stop=stop)
    assert host[4][1][1] and not host[3][1][1]
    assert steps(model, settings, True, eos_token_id=eos, stop=stop) == host


class CountCopies(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.copies += func is torch.Tensor.cpu
        return func(*args, **(kwargs or {}))


def test_tokens_reach_the_host_once_per_block(model):
    """2 blocks + 5 tokens: three copies to the host (the host loop makes two per row and token)."""
    with CountCopies() as count:
        steps(model, SETTINGS[1], on_device=True)
    assert count.copies == 3

"""The native decoding step on several threads (its large projections split by output rows over the
kernels' kept worker threads, `ssm/kernels/pool.h`) gives exactly the one-thread step's numbers, in
float32 and int8, with and without the FFN; and a forked child process (which has none of the parent's
workers) still gets its split products."""

import multiprocessing

import pytest
import torch

from helpers import requires_native_kernel
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM
from sparse_ssm.model.quantize import quantize_model

# width 512: in_proj holds 2 x 1024 x 512 = 2^20 weights, the smallest map that is split; FFN 2048 splits too
CONFIG = dict(vocab_size=97, hidden_dim=512, state_dim=16, ffn_dim=2048, num_layers=1, max_seq_len=64, dropout=0.0)


def decode_logits(model, ids, threads: int) -> torch.Tensor:
    """Logits of 5 greedy-fed steps after a 4-token prompt, with `threads` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            _, cache = model.prefill(ids[:, :4])
            return torch.stack([model.step(ids[:, t], cache)[0] for t in range(4, ids.shape[1])], 1)
    finally:
        torch.set_num_threads(before)


def model_of(int8: bool, ffn_dim: int) -> SparseSSMForCausalLM:
    torch.manual_seed(0)
    model = SparseSSMForCausalLM(SparseSSMConfig(**{**CONFIG, "ffn_dim": ffn_dim})).eval()
    return quantize_model(model) if int8 else model


@requires_native_kernel()
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("ffn_dim", [0, 2048])
def test_the_step_on_two_threads_equals_the_step_on_one(int8, rows, ffn_dim):
    model = model_of(int8, ffn_dim)
    ids = torch.randint(0, 97, (rows, 9), generator=torch.Generator().manual_seed(rows))
    one = decode_logits(model, ids, 1)
    assert torch.equal(decode_logits(model, ids, 2), one)          # each output row summed as on one thread
    assert torch.equal(decode_logits(model, ids, 2), one)          # the workers kept from the loop before


def _head_on_two_threads(x, weight, queue=None):
    """The native LM head of x with 2 threads of the kernels' own (torch's stay at 1: a forked child
    of a process whose OpenMP threads ran hangs in torch's own parallel regions, kernels or not)."""
    from sparse_ssm.ssm.kernels import native_library, ptr
    torch.set_num_threads(1)
    out = x.new_empty(x.shape[0], weight.shape[0])
    native_library().ssm_lm_head_f32(ptr(x), ptr(weight), ptr(out), x.shape[0], weight.shape[0], x.shape[1], 2)
    if queue is None:
        return out
    queue.put(out.tolist())                   # plain values: a tensor would be sent as a handle to shared memory


@requires_native_kernel()
def test_a_forked_child_gets_its_own_workers():
    g = torch.Generator().manual_seed(7)
    x, weight = torch.randn(1, 64, generator=g), torch.randn(301, 64, generator=g)
    expected = _head_on_two_threads(x, weight)                     # the parent's workers exist now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_head_on_two_threads, args=(x, weight, queue))
    child.start()
    try:
        got = torch.tensor(queue.get(timeout=60))                  # waiting on the parent's workers would hang
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    torch.testing.assert_close(got, x @ weight.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, expected)

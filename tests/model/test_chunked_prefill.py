"""Chunked prefill: a prompt read through the parallel scan C tokens at a time, each layer's state
(SSM state and conv tail) carried from chunk to chunk, gives the logits and the final cache of the
one-pass prefill and of the token-by-token recurrent step loop (float32), for every structure
family, odd lengths and chunk sizes that do and do not divide the length; `generate` reads its
prompts in chunks of `generation.prefill_chunk_tokens`."""

import pytest
import torch

from helpers import randomise_generators, tiny_language_model
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM
from sparse_ssm.generate import GenerationConfig, generate_text

FAMILIES = {"diagonal": dict(selective_param_class="sparse", sparsity_level=0.9),
            "block": dict(selective_param_class="sparse", sparsity_level=0.5),
            "rotation": dict(selective_param_class="rotation", learned_initial_state=True),
            "householder": dict(selective_param_class="householder", low_rank_rank=2),
            "low-rank": dict(selective_param_class="low_rank", discretization="bilinear", low_rank_rank=2)}
LENGTH = 23                                   # odd; chunks 1, 4, 7 leave remainders, 23 and 40 are one pass


def model_of(family):
    config = SparseSSMConfig(vocab_size=97, hidden_dim=32, state_dim=8, ffn_dim=48, num_layers=2, max_seq_len=64,
                             dropout=0.0, num_heads=2, scan_chunk_size=4, **FAMILIES[family])
    torch.manual_seed(0)
    return randomise_generators(SparseSSMForCausalLM(config).eval())


def assert_same_cache(cache, expected, tol):
    for state, want in zip(cache, expected, strict=True):
        assert torch.allclose(state.ssm, want.ssm, atol=tol, rtol=tol)
        assert torch.allclose(state.conv, want.conv, atol=tol, rtol=tol)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_one_pass_and_the_step_loop(family):
    model = model_of(family)
    ids = torch.randint(0, 97, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    whole_logits, whole_cache = model.prefill(ids)
    step_logits, step_cache = model.prefill(ids[:, :1])
    for t in range(1, LENGTH):
        step_logits, step_cache = model.step(ids[:, t], step_cache)
    for chunk in (1, 4, 7, LENGTH, 40):
        logits, cache = model.prefill(ids, chunk_tokens=chunk)
        for want_logits, want_cache in ((whole_logits, whole_cache), (step_logits, step_cache)):
            assert torch.allclose(logits, want_logits, atol=2e-5, rtol=1e-4), chunk
            assert_same_cache(cache, want_cache, 2e-5)


def test_prefill_continues_from_a_cache_without_changing_it():
    """What the server does: one chunk a round, the next from the previous one's cache."""
    model = model_of("diagonal")
    ids = torch.randint(0, 97, (1, LENGTH), generator=torch.Generator().manual_seed(2))
    logits, cache = model.prefill(ids[:, :10])
    kept = [(s.conv.clone(), s.ssm.clone()) for s in cache]
    logits, rest = model.prefill(ids[:, 10:], cache)
    for state, (conv, ssm) in zip(cache, kept):
        assert torch.equal(state.conv, conv) and torch.equal(state.ssm, ssm)
    whole_logits, whole_cache = model.prefill(ids)
    assert torch.allclose(logits, whole_logits, atol=2e-5, rtol=1e-4)
    assert_same_cache(rest, whole_cache, 2e-5)


def test_generate_reads_the_prompt_in_chunks_of_the_setting(monkeypatch):
    model, tokenizer = tiny_language_model(seed=3)
    prompt = "It was the best of times, it was the worst of times, it was the age of wisdom."
    one_pass = generate_text(model, tokenizer, [prompt], GenerationConfig(max_length=12, temperature=0,
                                                                          prefill_chunk_tokens=10_000))
    lengths, forward = [], model.forward

    def counted(input_ids, *args, **kwargs):
        lengths.append(input_ids.shape[1])
        return forward(input_ids, *args, **kwargs)
    monkeypatch.setattr(model, "forward", counted)
    chunked = generate_text(model, tokenizer, [prompt], GenerationConfig(max_length=12, temperature=0,
                                                                         prefill_chunk_tokens=3))
    assert chunked == one_pass
    prompt_tokens = len(tokenizer.encode(prompt).ids)
    assert lengths == [3] * (prompt_tokens // 3) + ([prompt_tokens % 3] if prompt_tokens % 3 else [])

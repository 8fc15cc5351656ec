"""The Hugging Face format: export, AutoModelForCausalLM / AutoTokenizer, transformers' generate on
our recurrent cache (greedy = our generate, the prefix never recomputed), trust_remote_code."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import ROOT, tiny_language_model, write_checkpoint
from sparse_ssm import cli
from sparse_ssm.generate import generate
from sparse_ssm.hf import SparseSSMHFCache, SparseSSMHFForCausalLM, export_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, tokenizer = tiny_language_model(seed=1)
    folder = export_model(model, tokenizer, tmp_path_factory.mktemp("hf") / "model")
    return model, tokenizer, folder


def test_export_writes_a_hugging_face_directory_that_auto_classes_load(exported):
    model, tokenizer, folder = exported
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "configuration_sparse_ssm.py", "modeling_sparse_ssm.py"} <= {p.name for p in folder.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(hf, SparseSSMHFForCausalLM) and hf.config.hidden_dim == model.config.hidden_dim
    assert hf.model.lm_head.weight is hf.model.embed.weight                       # tied again after loading
    for (name, a), b in zip(model.state_dict().items(), hf.model.state_dict().values()):
        assert torch.equal(a, b), name
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "Café, naïve and 42 foxes"
    assert hf_tokenizer(text).input_ids == tokenizer.encode(text).ids
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.decode(tokenizer.encode(text).ids) == text
    ids = torch.tensor([tokenizer.encode("The quick brown fox").ids])
    assert torch.allclose(hf(ids).logits, model(ids).logits)


def test_generate_greedy_equals_ours_and_never_recomputes_the_prefix(exported):
    model, tokenizer, folder = exported
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([tokenizer.encode("It was the best of times").ids])
    lengths = []                                        # tokens per call of the model: forward or step
    hook = hf.model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    step = hf.model.step
    hf.model.step = lambda tokens, cache: (lengths.append(tokens.shape[0] // ids.shape[0]), step(tokens, cache))[1]
    out = hf.generate(ids, max_new_tokens=12, do_sample=False)
    hook.remove()
    del hf.model.step
    assert torch.equal(out, generate(model, ids, 12, eos_token_id=tokenizer.token_to_id("<|endoftext|>"))[:, :out.shape[1]])
    assert out.shape[1] > ids.shape[1] + 1                                       # the test needs some decode steps
    assert lengths == [ids.shape[1]] + [1] * (out.shape[1] - ids.shape[1] - 1)  # prefill once, then one token a step
    # a left-padded batch: every row as if alone
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = ["It was the best of times", "Call me"]
    batch = hf_tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    rows = hf.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch.input_ids.shape[1]:]
    for prompt, row in zip(prompts, rows):
        alone = torch.tensor([tokenizer.encode(prompt).ids])
        assert row.tolist() == generate(model, alone, 6)[0, alone.shape[1]:].tolist()


def test_generate_sampling_beams_and_a_returned_cache(exported):
    model, tokenizer, folder = exported
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([tokenizer.encode("The sun rose").ids])
    assert hf.generate(ids, max_new_tokens=5, do_sample=True, top_k=10, num_return_sequences=3).shape == (3, ids.shape[1] + 5)
    assert hf.generate(ids, max_new_tokens=5, num_beams=3).shape[0] == 1
    out = hf.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert isinstance(cache, SparseSSMHFCache) and cache.get_seq_length() == ids.shape[1] + 3
    logits, state = model.prefill(out.sequences[:, :-1])
    for ours, theirs in zip(state, cache.states):
        assert torch.allclose(ours.ssm, theirs.ssm, atol=1e-5) and torch.allclose(ours.conv, theirs.conv, atol=1e-6)


def test_loss_matches_ours(exported):
    model, tokenizer, folder = exported
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([tokenizer.encode("The merchant sold spices, silk and tea").ids])
    assert torch.allclose(hf(ids, labels=ids).loss, model(ids, labels=ids).loss)


@pytest.mark.slow
def test_trust_remote_code_loads_without_importing_sparse_ssm_first(exported, tmp_path):
    _, tokenizer, folder = exported
    script = ("import sys\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
              "assert 'sparse_ssm' not in sys.modules\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
              f"t = AutoTokenizer.from_pretrained({str(folder)!r})\n"
              "print(type(m).__name__, m.generate(t('The sun', return_tensors='pt').input_ids, max_new_tokens=3,"
              " do_sample=False).tolist())\n"
              f"m.save_pretrained({str(tmp_path / 'again')!r})\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("SparseSSMHFForCausalLM")
    assert (tmp_path / "again" / "modeling_sparse_ssm.py").is_file()


@pytest.mark.slow
def test_cli_export(tmp_path, capsys):
    model, tokenizer = tiny_language_model(seed=2)
    write_checkpoint(tmp_path / "run" / "best", model, tokenizer)
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "export", "--model-dir", str(tmp_path / "run"),
                           "--format", "hf", "--output", str(tmp_path / "hf")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)          # the command's smoke test, in a fresh interpreter
    assert proc.returncode == 0, proc.stderr[-2000:]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(hf.model.embed.weight, model.embed.weight)
    assert cli.main(["export", "--model-dir", str(tmp_path / "none"), "--output", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_import_sparse_ssm_leaves_transformers_alone_and_the_lazy_names_register():
    script = ("import sys, sparse_ssm\nassert 'transformers' not in sys.modules\n"
              "cls = sparse_ssm.SparseSSMHFForCausalLM\n"
              "from transformers import AutoConfig\n"
              "print(type(AutoConfig.for_model('sparse_ssm', vocab_size=10)).__name__, cls.__name__)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["SparseSSMHFConfig", "SparseSSMHFForCausalLM"]

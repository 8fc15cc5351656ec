"""create-synthetic: prompts, filters, de-duplication, the files it writes, resume, and the Ollama
backend against a local server speaking Ollama's API (with a real, small SSM LM behind it)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from helpers import ROOT, make_text
from ollama_server import OllamaAPIServer, model_backed
from sparse_ssm import cli
from sparse_ssm.data.tokenizer import train_tokenizer
from sparse_ssm.teacher import Request, make_teacher
from sparse_ssm.teacher.config import SyntheticConfig
from sparse_ssm.teacher.gguf import TokenStringMapper, ollama_model_blob
from sparse_ssm.teacher.ollama import OllamaTeacher
from sparse_ssm.teacher.quality import NearDuplicates, quality_problem
from sparse_ssm.teacher.synthetic import create_synthetic, make_prompt, output_paths
from sparse_ssm.util.errors import SyntheticError, TeacherError
from ssm_teacher import SSMTeacher, synthetic_config as config

DEFAULT_CONFIG = str(ROOT / "config" / "default_config.yaml")


def test_prompts_are_deterministic_diverse_and_follow_the_style():
    cfg = SyntheticConfig(backend="llama_cpp")
    prompts = [make_prompt(cfg, i, prompt_style="opening") for i in range(40)]
    assert prompts == [make_prompt(cfg, i, prompt_style="opening") for i in range(40)]
    assert len({p["topic"] for p in prompts}) > 10 and len({p["prompt"] for p in prompts}) > 30
    assert all(p["topic"] in p["prompt"] or p["topic"].capitalize() in p["prompt"] for p in prompts)
    instruct = make_prompt(SyntheticConfig(), 3, prompt_style="instruction")
    assert instruct["prompt"].startswith("Write a ") and instruct["style"] in instruct["prompt"]
    with pytest.raises(SyntheticError, match="only"):
        make_prompt(SyntheticConfig(instruction="About {subject}"), 0, prompt_style="instruction")


def test_quality_filters():
    good = "The river ran past the mill and the children watched the boats go by in the evening light."
    assert quality_problem(good, 5) is None
    assert quality_problem("   \n", 5) == "empty"
    assert quality_problem("Too short.", 5) == "too_short"
    assert quality_problem("the cat sat on the mat " * 20, 5) == "repetitive"
    assert quality_problem("\n".join(["A line that repeats here."] * 5 + ["Another one."]), 3) == "repetitive"


def test_near_duplicates_are_found_and_different_texts_kept():
    base = make_text(12, seed=1).replace("\n", " ")
    dedup = NearDuplicates(threshold=0.8)
    assert dedup.check_and_add(base) is None
    assert dedup.check_and_add(base.upper()) == "duplicate"                      # same words
    words = base.split()
    words[len(words) // 2] = "zebra"
    assert dedup.check_and_add(" ".join(words)) == "near_duplicate"              # one word changed
    assert dedup.check_and_add(make_text(12, seed=99).replace("\n", " ")) is None


def test_dataset_files_and_teacher_targets_match_the_model(tmp_path):
    teacher = SSMTeacher(tmp_path)
    cfg = config(tmp_path, distillation=True, top_logprobs=5)
    stats = create_synthetic(cfg, teacher, progress=False, log=lambda *_: None)
    paths = output_paths(cfg)
    data = json.loads(paths["json"].read_text())
    assert data["version"] == 1 and data["teacher"] == {"backend": "ssm", "model": "tiny"}
    assert data["prompt_style"] == "opening" and data["distillation"]["top_k"] == 5
    assert len(data["records"]) == stats["samples"] == 4 and not paths["partial"].exists()
    assert Tokenizer.from_file(str(paths["tokenizer"])).get_vocab_size() == teacher.tokenizer.get_vocab_size()
    arrays = load_file(str(paths["teacher"]))
    offsets, targets = arrays["record_offsets"], arrays["target_offsets"]
    for r, record in enumerate(data["records"]):
        ids = arrays["token_ids"][offsets[r]:offsets[r + 1]]
        start = int(arrays["teacher_start"][r])
        assert record["text"].startswith(record["prompt"])
        assert teacher.tokenizer.decode(ids.tolist()) == record["text"]
        rows = slice(targets[r], targets[r + 1])
        assert targets[r + 1] - targets[r] == len(ids) - start == record["num_tokens"]
        # the stored top-k is the model's own next-token distribution at each generated position
        with torch.no_grad():
            logp = torch.log_softmax(teacher.model(torch.tensor(ids[None].astype(np.int64))).logits[0], -1)
        expected = torch.topk(logp[start - 1:len(ids) - 1], 5)
        assert np.array_equal(arrays["top_ids"][rows], expected.indices.numpy())
        assert np.allclose(arrays["top_logprobs"][rows], expected.values.numpy(), atol=1e-4)


def test_an_interrupted_run_resumes_to_the_same_dataset(tmp_path):
    straight = config(tmp_path / "a", distillation=True)
    create_synthetic(straight, SSMTeacher(tmp_path), progress=False, log=lambda *_: None)
    cfg = config(tmp_path / "b", distillation=True)
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        create_synthetic(cfg, SSMTeacher(tmp_path, fail_after=2), progress=False, log=lambda *_: None)
    paths = output_paths(cfg)
    assert not paths["json"].exists() and len(paths["partial"].read_text().splitlines()) == 3   # header + 2
    with pytest.raises(SyntheticError, match="--resume"):
        create_synthetic(cfg, SSMTeacher(tmp_path), progress=False, log=lambda *_: None)
    with pytest.raises(SyntheticError, match="other settings"):
        create_synthetic(config(tmp_path / "b", distillation=True, temperature=0.5), SSMTeacher(tmp_path),
                         resume=True, progress=False, log=lambda *_: None)
    resumed = SSMTeacher(tmp_path)
    create_synthetic(cfg, resumed, resume=True, progress=False, log=lambda *_: None)
    assert resumed.calls == 2
    a, b = (json.loads(output_paths(c)["json"].read_text())["records"] for c in (straight, cfg))
    assert a == b
    x, y = (load_file(str(output_paths(c)["teacher"])) for c in (straight, cfg))
    assert all(np.array_equal(x[key], y[key]) for key in x)
    with pytest.raises(SyntheticError, match="--overwrite"):
        create_synthetic(cfg, SSMTeacher(tmp_path), progress=False, log=lambda *_: None)


# --- Ollama --------------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path):
    teacher = SSMTeacher(tmp_path)
    with OllamaAPIServer(model_backed(teacher, lambda i: teacher.tokenizer.decode([i], skip_special_tokens=False))) as s:
        s.teacher = teacher
        yield s


def test_ollama_backend_generates_through_the_official_client(server):
    teacher = OllamaTeacher("phi4-mini", host=server.host)
    request = Request(prompt="Write a story.", max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=20, seed=5)
    out = teacher.complete(request)
    local = server.teacher.complete(Request(**{**request.__dict__, "top_logprobs": 1}))
    assert out.text == local.text and out.num_tokens == local.num_tokens
    sent = server.requests[-1]
    assert sent["options"] == {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "num_predict": 12, "seed": 5}
    assert sent["stream"] is False


def test_ollama_logprob_strings_map_back_to_the_teachers_ids(server, tmp_path):
    teacher = OllamaTeacher("phi4-mini", host=server.host)
    teacher._tokenizer_json = server.teacher.path     # the GGUF-store route is tested with the real Gemma file
    request = Request(prompt="Once upon a time", max_new_tokens=16, temperature=1.0, top_p=1.0, top_k=0, seed=3,
                      top_logprobs=4)
    out = teacher.complete(request)
    local = server.teacher.complete(request)
    # a lone byte of a multi-byte character has no text of its own: Ollama cannot name it, it maps to -1
    text = lambda i: server.teacher.tokenizer.decode([int(i)], skip_special_tokens=False)
    whole = [i for i in local.token_ids if "\ufffd" not in text(i)]
    assert 0 < len(whole) and [i for i in out.token_ids if i >= 0] == whole
    assert all(i == -1 for i, j in zip(out.token_ids, local.token_ids) if j not in whole)
    valid = np.vectorize(lambda i: "\ufffd" not in text(i))(local.top_ids)
    assert np.array_equal(np.where(valid, local.top_ids, -1), out.top_ids)
    assert np.allclose(out.top_logprobs[valid], local.top_logprobs[valid], atol=1e-6)


def test_byte_level_token_strings_map_to_ids():
    tokenizer = train_tokenizer([make_text(300)], 400)
    mapper = TokenStringMapper(tokenizer)
    ids = tokenizer.encode("The quick brown fox, naïve café 🙂 and 3.14159!").ids
    assert [mapper(tokenizer.decode([i])) for i in ids if "\ufffd" not in tokenizer.decode([i])] == \
        [i for i in ids if "\ufffd" not in tokenizer.decode([i])]
    assert mapper("no-such-token-xyz") == -1 and mapper.unmapped == 1


def test_create_synthetic_cli_with_ollama_and_workers(server, tmp_path, capsys):
    code = cli.main(["create-synthetic", "--config", DEFAULT_CONFIG, "--host", server.host,
                     "--num-samples", "5", "--max-new-tokens", "20", "--workers", "3", "--output-dir",
                     str(tmp_path / "syn"), "--output-file", "d.json", "--set", "synthetic.min_words=2"])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "syn" / "d.json").read_text())
    assert data["teacher"]["backend"] == "ollama" and data["prompt_style"] == "instruction"
    assert len(data["records"]) == 5 and "samples/s" in out
    assert all(r["prompt"].startswith("Write a ") for r in data["records"])


def synthetic_cli(server, folder, *flags):
    """create-synthetic through the CLI, in this process, with the local Ollama server as the teacher."""
    return cli.main(["create-synthetic", "--config", DEFAULT_CONFIG, "--backend", "ollama", "--host", server.host,
                     "--max-new-tokens", "12", "--output-dir", str(folder), "--output-file", "d.json",
                     "--set", "synthetic.min_words=1", *flags])


def test_create_synthetic_cli_prompts_seed_and_temperature_reach_every_request(server, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about bees.\n\nA letter\\nabout the sea.\n")    # "\\n" in a line is a newline
    assert synthetic_cli(server, tmp_path / "syn", "--num-samples", "3", "--prompts", str(prompts), "--seed", "5",
                         "--temperature", "0.3") == 0
    sent = [r for r in server.requests if r["path"] == "/api/generate"]
    in_turn = ["Tell me about bees.", "A letter\nabout the sea."]
    assert len(sent) >= 3 and [r["prompt"] for r in sent] == [in_turn[i % 2] for i in range(len(sent))]
    assert [r["options"]["seed"] for r in sent] == [5 * 7919 + i for i in range(len(sent))]
    assert {r["options"]["temperature"] for r in sent} == {0.3}
    data = json.loads((tmp_path / "syn" / "d.json").read_text())
    assert data["sampling"]["seed"] == 5 and data["sampling"]["temperature"] == 0.3
    assert len(data["records"]) == 3 and {r["prompt"] for r in data["records"]} <= set(in_turn)
    assert not any(r["text"].startswith(r["prompt"]) for r in data["records"])   # a file's prompts are not text


def test_create_synthetic_cli_resume_continues_and_overwrite_replaces(server, tmp_path, capsys):
    assert synthetic_cli(server, tmp_path / "straight", "--num-samples", "4") == 0
    server.fail_after = server.accepted + 2                   # the teacher fails after two more answers
    assert synthetic_cli(server, tmp_path / "cut", "--num-samples", "4") == 1
    assert "HTTP 500" in capsys.readouterr().err
    partial = tmp_path / "cut" / ".d.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 1 + 2 and not (tmp_path / "cut" / "d.json").exists()
    server.fail_after = None
    assert synthetic_cli(server, tmp_path / "cut", "--num-samples", "4") == 1    # not without --resume
    assert "continue it with --resume" in capsys.readouterr().err
    before = server.accepted
    assert synthetic_cli(server, tmp_path / "cut", "--num-samples", "4", "--resume") == 0
    assert "resuming: 2 requests already done" in capsys.readouterr().out
    assert server.accepted - before == 2 and not partial.exists()
    records = lambda folder: json.loads((folder / "d.json").read_text())["records"]
    assert records(tmp_path / "cut") == records(tmp_path / "straight")

    assert synthetic_cli(server, tmp_path / "cut", "--num-samples", "2") == 1      # an existing dataset is kept
    assert "pass --overwrite" in capsys.readouterr().err and len(records(tmp_path / "cut")) == 4
    assert synthetic_cli(server, tmp_path / "cut", "--num-samples", "2", "--overwrite") == 0
    assert records(tmp_path / "cut") == records(tmp_path / "straight")[:2]


@pytest.mark.slow
def test_create_synthetic_command_in_a_fresh_interpreter(server, tmp_path):
    """The command's smoke test: `python main.py create-synthetic` from another directory."""
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "create-synthetic", "--config", DEFAULT_CONFIG,
                           "--backend", "ollama", "--host", server.host, "--num-samples", "2", "--max-new-tokens", "8",
                           "--output-dir", str(tmp_path / "syn"), "--set", "synthetic.min_words=1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {tmp_path / 'syn' / 'phi4_dataset.json'}: 2 samples" in proc.stdout
    assert len(json.loads((tmp_path / "syn" / "phi4_dataset.json").read_text())["records"]) == 2


def test_auto_backend_takes_an_ollama_server_that_has_the_model(server, tmp_path):
    notes = []
    teacher = make_teacher(SyntheticConfig(host=server.host), log=notes.append)
    assert isinstance(teacher, OllamaTeacher) and teacher.model == "phi4-mini" and not notes
    assert server.requests[-1]["path"] == "/api/show"
    cfg = SyntheticConfig(host=server.host, model=str(tmp_path / "missing.gguf"))
    with pytest.raises(TeacherError, match="missing.gguf does not exist"):
        make_teacher(cfg, log=notes.append)        # a server without the model: on to the local GGUF backend
    assert f"the Ollama server at {server.host} does not have" in notes[0] and "using the local teacher" in notes[0]


def test_ollama_errors_say_what_to_do(server, tmp_path, capsys, refused_url):
    with pytest.raises(TeacherError, match="ollama serve"):
        OllamaTeacher("phi4-mini", host=refused_url)
    with pytest.raises(TeacherError, match="ollama pull llama9"):
        OllamaTeacher("llama9", host=server.host)
    teacher = OllamaTeacher("phi4-mini", host=server.host)
    with pytest.raises(TeacherError, match="top_logprobs must be between 0 and 20"):
        teacher.complete(Request("x", 4, 1.0, 1.0, 0, 0, top_logprobs=25))
    server.malformed = True
    with pytest.raises(TeacherError, match="bad answer"):
        teacher.complete(Request("x", 4, 1.0, 1.0, 0, 0))
    code = cli.main(["create-synthetic", "--config", DEFAULT_CONFIG, "--backend", "ollama", "--host", refused_url,
                     "--output-dir", str(tmp_path / "none")])
    assert code == 1 and "ollama serve" in capsys.readouterr().err
    assert not (tmp_path / "none").exists() or not list((tmp_path / "none").iterdir())


def test_auto_backend_falls_back_to_a_local_teacher_when_ollama_is_absent(tmp_path, refused_url):
    notes = []
    cfg = SyntheticConfig(host=refused_url, model=str(tmp_path / "missing.gguf"))
    with pytest.raises(TeacherError, match="missing.gguf does not exist"):
        make_teacher(cfg, log=notes.append)        # it went on to the local GGUF backend
    assert f"no Ollama server answers at {cfg.host}; using the local teacher" in notes[0]


def test_ollama_model_store_lookup(tmp_path):
    blob = tmp_path / "blobs" / ("sha256-" + "ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"GGUF")
    manifest = {"layers": [{"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32},
                           {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + "ab" * 32}]}
    for parts, name in [(("library", "phi4-mini", "latest"), "phi4-mini"), (("me", "tiny", "q4"), "me/tiny:q4")]:
        path = tmp_path / "manifests" / "registry.ollama.ai" / Path(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest))
        assert ollama_model_blob(name, tmp_path) == blob
    with pytest.raises(TeacherError, match="ollama pull qwen"):
        ollama_model_blob("qwen", tmp_path)


def test_a_failing_teacher_leaves_nothing_behind_and_distillation_needs_its_tokenizer(server, tmp_path, monkeypatch):
    cfg = config(tmp_path, backend="ollama")
    teacher = OllamaTeacher("phi4-mini", host=server.host)
    server.malformed = True
    with pytest.raises(TeacherError, match="bad answer"):
        create_synthetic(cfg, teacher, progress=False, log=lambda *_: None)
    assert not list(Path(cfg.output_dir).iterdir())
    server.malformed = False
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "empty-store"))
    requests_before = len(server.requests)
    with pytest.raises(TeacherError, match="ollama pull phi4-mini"):
        create_synthetic(config(tmp_path, backend="ollama", distillation=True), teacher, progress=False,
                         log=lambda *_: None)
    assert len(server.requests) == requests_before          # stopped before asking anything


def test_create_synthetic_checks_its_inputs_before_the_teacher_loads(tmp_path, monkeypatch, capsys):
    def make_teacher(*_, **__):
        raise AssertionError("the teacher was loaded before the inputs were checked")
    monkeypatch.setattr("sparse_ssm.teacher.make_teacher", make_teacher)
    (tmp_path / "file").write_text("a regular file")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "d.json").write_text("{}")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00")
    base = ["create-synthetic", "--config", DEFAULT_CONFIG, "--output-file", "d.json"]
    for args, message in [(["--output-dir", str(tmp_path / "file" / "sub")], "/file/sub: cannot create it"),
                          (["--output-dir", str(tmp_path / "out"), "--prompts", str(tmp_path / "none.txt")],
                           "none.txt does not exist"),
                          (["--output-dir", str(tmp_path / "out"), "--prompts", str(tmp_path / "binary.txt")],
                           "binary.txt is unreadable"),
                          (["--output-dir", str(tmp_path / "done")], "d.json already exists: pass --overwrite")]:
        assert cli.main([*base, *args]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err

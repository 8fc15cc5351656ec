"""create-synthetic: prompts, filters, de-duplication, the files it writes, resume, and the Ollama
backend against a local server speaking Ollama's API (with a real, small SSM LM behind it)."""

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from helpers import make_text
from ollama_server import OllamaAPIServer, model_backed
from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM, cli
from sparse_ssm.data.tokenizer import EOS, train_tokenizer
from sparse_ssm.teacher import Request
from sparse_ssm.teacher.backends import LocalTeacher
from sparse_ssm.teacher.config import SyntheticConfig
from sparse_ssm.teacher.gguf import TokenStringMapper, ollama_model_blob
from sparse_ssm.teacher.ollama import OllamaTeacher
from sparse_ssm.teacher.quality import NearDuplicates, quality_problem
from sparse_ssm.teacher.synthetic import create_synthetic, make_prompt, output_paths
from sparse_ssm.util.errors import SyntheticError, TeacherError


class SSMTeacher(LocalTeacher):
    """A real (small, randomly initialised) language model of ours behind the teacher interface,
    decoded by the same loop as the GGUF backends."""

    backend = "ssm"

    def __init__(self, folder: Path, fail_after: int | None = None):
        self.tokenizer = train_tokenizer([make_text(400, seed=s) for s in range(3)], 300)
        self.path = folder / "teacher-tokenizer.json"
        self.tokenizer.save(str(self.path))
        torch.manual_seed(0)
        self.model = SparseSSMForCausalLM(SparseSSMConfig(vocab_size=self.tokenizer.get_vocab_size(), hidden_dim=32,
                                                          state_dim=8, ffn_dim=0, num_layers=2, max_seq_len=512,
                                                          dropout=0.0)).eval()
        self.stop_ids = {self.tokenizer.token_to_id(EOS)}
        self.pad_id = self.tokenizer.token_to_id(EOS)
        self.fail_after, self.calls = fail_after, 0

    def describe(self):
        return {"backend": "ssm", "model": "tiny"}

    def tokenizer_json(self):
        return self.path

    def complete(self, request):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return super().complete(request)

    def _tokenize(self, text):
        return self.tokenizer.encode(text).ids

    @torch.no_grad()
    def _start(self, prompts):
        logits, self.cache = self.model.prefill(torch.tensor(prompts))
        return logits

    @torch.no_grad()
    def _next(self, tokens):
        logits, self.cache = self.model.step(torch.tensor(tokens), self.cache)
        return logits

    def _detokenize(self, ids):
        return self.tokenizer.decode(ids)


def config(tmp_path, **kw):
    values = dict(backend="transformers", num_samples=4, max_new_tokens=24, min_words=3, output_dir=str(tmp_path / "out"),
                  output_file="data.json", temperature=1.0, top_k=0, top_p=1.0)
    values.update(kw)
    cfg = SyntheticConfig(**values)
    return cfg


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
    code = cli.main(["create-synthetic", "--config", "config/default_config.yaml", "--host", server.host,
                     "--num-samples", "5", "--max-new-tokens", "20", "--workers", "3", "--output-dir",
                     str(tmp_path / "syn"), "--output-file", "d.json", "--set", "synthetic.min_words=2"])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "syn" / "d.json").read_text())
    assert data["teacher"]["backend"] == "ollama" and data["prompt_style"] == "instruction"
    assert len(data["records"]) == 5 and "samples/s" in out
    assert all(r["prompt"].startswith("Write a ") for r in data["records"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ollama_errors_say_what_to_do(server, tmp_path, capsys):
    with pytest.raises(TeacherError, match="ollama serve"):
        OllamaTeacher("phi4-mini", host=f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(TeacherError, match="ollama pull llama9"):
        OllamaTeacher("llama9", host=server.host)
    teacher = OllamaTeacher("phi4-mini", host=server.host)
    with pytest.raises(TeacherError, match="top_logprobs must be between 0 and 20"):
        teacher.complete(Request("x", 4, 1.0, 1.0, 0, 0, top_logprobs=25))
    server.malformed = True
    with pytest.raises(TeacherError, match="bad answer"):
        teacher.complete(Request("x", 4, 1.0, 1.0, 0, 0))
    code = cli.main(["create-synthetic", "--config", "config/default_config.yaml", "--backend", "ollama", "--host",
                     f"http://127.0.0.1:{_free_port()}", "--output-dir", str(tmp_path / "none")])
    assert code == 1 and "ollama serve" in capsys.readouterr().err
    assert not (tmp_path / "none").exists() or not list((tmp_path / "none").iterdir())


def test_auto_backend_falls_back_to_a_local_teacher_when_ollama_is_absent(tmp_path):
    from sparse_ssm.teacher import make_teacher

    notes = []
    cfg = SyntheticConfig(host=f"http://127.0.0.1:{_free_port()}", model=str(tmp_path / "missing.gguf"))
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


def test_the_local_server_speaks_ollamas_streaming_and_listing_api(server):
    import ollama

    client = ollama.Client(host=server.host)
    assert [m.model for m in client.list().models] == ["phi4-mini:latest"]
    options = {"temperature": 0.9, "num_predict": 10, "seed": 11}
    whole = client.generate(model="phi4-mini", prompt="Hello", options=options, logprobs=True, top_logprobs=2)
    parts = list(client.generate(model="phi4-mini", prompt="Hello", options=options, stream=True, logprobs=True,
                                 top_logprobs=2))
    assert "".join(p.response for p in parts) == whole.response and parts[-1].done
    assert [lp.token for p in parts for lp in (p.logprobs or [])] == [lp.token for lp in whole.logprobs]
    assert all(len(lp.top_logprobs) == 2 for lp in whole.logprobs)


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
    base = ["create-synthetic", "--config", "config/default_config.yaml", "--output-file", "d.json"]
    for args, message in [(["--output-dir", str(tmp_path / "file" / "sub")], "/file/sub: cannot create it"),
                          (["--output-dir", str(tmp_path / "out"), "--prompts", str(tmp_path / "none.txt")],
                           "none.txt does not exist"),
                          (["--output-dir", str(tmp_path / "out"), "--prompts", str(tmp_path / "binary.txt")],
                           "binary.txt is unreadable"),
                          (["--output-dir", str(tmp_path / "done")], "d.json already exists: pass --overwrite")]:
        assert cli.main([*base, *args]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err

"""create-synthetic given a bad server address, or a named Ollama model that no server or local
store has: a clear error instead of a traceback or a run with another model (the bundled Gemma)."""

import pytest

from helpers import ROOT
from sparse_ssm import cli
from sparse_ssm.teacher import make, make_teacher
from sparse_ssm.teacher.config import SyntheticConfig
from sparse_ssm.teacher.ollama import OllamaTeacher
from sparse_ssm.teacher.synthetic import create_synthetic, output_paths
from sparse_ssm.util.errors import ConfigError, SyntheticError, TeacherError
from ssm_teacher import SSMTeacher, synthetic_config

DEFAULT_CONFIG = str(ROOT / "config" / "default_config.yaml")


@pytest.mark.parametrize("host, problem", [("ftp://[::1", "the scheme 'ftp' is not http or https"),
                                           ("http://[::1", "Invalid IPv6 URL"),
                                           ("localhost:port", "Port could not be cast to integer")])
def test_a_host_that_is_no_server_address_is_a_config_error(host, problem, tmp_path, capsys):
    code = cli.main(["create-synthetic", "--config", DEFAULT_CONFIG, "--host", host, "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: synthetic.host: {host!r} is not an Ollama server address ({problem}")
    assert "give http://HOST:PORT, e.g. http://127.0.0.1:11434" in err


def test_a_bad_ollama_host_variable_is_named(monkeypatch):
    pytest.importorskip("ollama")
    monkeypatch.setenv("OLLAMA_HOST", "http://[::1")
    with pytest.raises(TeacherError, match=r"the environment variable OLLAMA_HOST: 'http://\[::1' is not an Ollama"):
        OllamaTeacher("phi4-mini")


@pytest.fixture
def local_loads(tmp_path, monkeypatch):
    """The models the local backends were asked to load (their loading, tens of seconds for the
    bundled Gemma, replaced by a recorder); no Ollama model is in the local store."""
    pytest.importorskip("ollama")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "empty-store"))
    loaded = []
    for backend in ("LlamaCppTeacher", "TransformersTeacher"):
        monkeypatch.setattr(make, backend, lambda model, *args, **kw: loaded.append(model))
    return loaded


def test_auto_with_a_named_model_and_no_server_fails_instead_of_running_gemma(local_loads, refused_url, tmp_path,
                                                                              capsys):
    code = cli.main(["create-synthetic", "--config", DEFAULT_CONFIG, "--backend", "auto", "--model", "llama9",
                     "--host", refused_url, "--output-dir", str(tmp_path / "syn")])
    err = capsys.readouterr().err
    assert code == 1 and not local_loads, err
    assert f"no Ollama server answers at {refused_url}, and the Ollama model 'llama9' you named" in err
    assert "ollama serve" in err and "ollama pull llama9" in err and "--backend llama_cpp --model PATH.gguf" in err


def test_auto_falls_back_to_the_bundled_gemma_only_when_no_model_was_named(local_loads, refused_url):
    """The default model (unset, or phi4-mini as the default config names it) is no choice of the
    user's: without a server auto takes the bundled Gemma; a named one is not replaced."""
    notes = []
    for model in (None, "phi4-mini"):
        make_teacher(SyntheticConfig(host=refused_url, model=model), log=notes.append)
    assert local_loads == ["gemma3-270m", "gemma3-270m"]
    assert f"no Ollama server answers at {refused_url}; using the local teacher instead" in notes[0]
    with pytest.raises(TeacherError, match="'qwen3:0.6b' you named is not in the local Ollama model store"):
        make_teacher(SyntheticConfig(host=refused_url, model="qwen3:0.6b"), log=notes.append)
    assert local_loads == ["gemma3-270m", "gemma3-270m"] and len(notes) == 2


def test_a_partial_file_that_is_not_utf8_is_refused(tmp_path):
    cfg = synthetic_config(tmp_path / "syn")
    output_paths(cfg)["partial"].parent.mkdir(parents=True)
    output_paths(cfg)["partial"].write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(SyntheticError, match="is not a partial synthetic run; delete it"):
        create_synthetic(cfg, SSMTeacher(tmp_path), resume=True, progress=False, log=lambda *_: None)


def test_the_host_check_accepts_what_the_ollama_client_reads():
    for host in ("localhost", ":5000", "example.com:56789/path", "https://[::1]:8080", "[::1]:11434"):
        assert SyntheticConfig(host=host).host == host
    with pytest.raises(ConfigError, match="it names no host"):
        SyntheticConfig(host="http://")


def test_a_model_name_that_is_not_utf8_is_refused(local_loads, refused_url, tmp_path, capsys):
    model = b"phi\xff".decode("utf-8", "surrogateescape")          # what Python makes of `--model $'phi\xff'`
    code = cli.main(["create-synthetic", "--config", DEFAULT_CONFIG, "--model", model, "--host", refused_url,
                     "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and not local_loads and "error: --model: not valid UTF-8 text (byte 0xff at character 3)" in err

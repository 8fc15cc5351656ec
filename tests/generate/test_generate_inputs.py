"""`generate` given bytes that are not UTF-8 (a prompt argument, a prompts file) or a file where a
folder belongs: a one-line error that names the problem and the fix, exit code 2."""

import io
import sys

import pytest

from helpers import tiny_language_model, write_checkpoint
from sparse_ssm import cli


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, tokenizer = tiny_language_model(max_seq_len=1024)    # the length the saved config's dataset takes
    return write_checkpoint(tmp_path_factory.mktemp("inputs") / "run" / "checkpoints" / "step-00000001", model,
                            tokenizer)


def _generate(checkpoint, *args):
    return cli.main(["generate", "--model-dir", str(checkpoint), "--max-length", "2", "--temperature", "0", *args])


def test_a_prompt_argument_that_is_not_utf8_is_refused(checkpoint, capsys):
    """Python decodes the argument bytes b'The \\xff' of `--prompt $'The \\xff'` to 'The \\udcff'."""
    assert _generate(checkpoint, "--prompt", b"The \xff".decode("utf-8", "surrogateescape")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --prompt: not valid UTF-8 text (byte 0xff at character 4); pass UTF-8 text")
    assert err.count("\n") == 1
    assert _generate(checkpoint, "--prompt", "The sun", "--stop", "\udcfe") == 2
    assert "error: --stop: not valid UTF-8 text (byte 0xfe" in capsys.readouterr().err


def test_a_prompts_file_that_is_not_utf8_is_refused(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("The sun\nCaf\xe9 au lait\n".encode("latin-1"))
    assert _generate(checkpoint, "--prompts-file", str(prompts)) == 2
    err = capsys.readouterr().err
    assert f"error: --prompts-file: {prompts} is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8" in err


def test_a_model_dir_that_is_a_file_says_so_and_what_is_expected(checkpoint, tmp_path, capsys):
    assert _generate(checkpoint / "model.safetensors", "--prompt", "The sun") == 2
    err = capsys.readouterr().err
    assert "model.safetensors is a file, not a folder (it is a checkpoint's file: pass its folder" in err
    assert "--model-dir takes a training output folder (with checkpoints/, latest, best/) or a checkpoint folder" in err
    (tmp_path / "notes.txt").write_text("x")
    assert _generate(tmp_path / "notes.txt", "--prompt", "The sun") == 2
    assert "notes.txt is a file, not a folder; --model-dir takes" in capsys.readouterr().err


def test_a_checkpoint_folder_is_a_model_dir(checkpoint, capsys):
    assert _generate(checkpoint, "--prompt", "The sun") == 0
    assert f"from {checkpoint})" in capsys.readouterr().err


def test_text_an_ascii_terminal_cannot_show_is_printed_as_question_marks(checkpoint, monkeypatch):
    """A stdout whose encoding lacks a character of the prompt or the text (a Windows code page, an
    ASCII locale) shows '?' instead of ending the command with a UnicodeEncodeError."""
    out, err = io.BytesIO(), io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, encoding="ascii"))
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(err, encoding="ascii"))
    assert _generate(checkpoint, "--prompt", "Café 日本") == 0
    sys.stdout.flush()
    assert out.getvalue().startswith(b"Caf? ??")

"""bench/serving.py (ours against llama.cpp at ~130 M): what it hands the converter, its flags, the
ratios it reports, the message without llama-cpp-python, and a dry run of our side."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import serving  # noqa: E402
import serving_models  # noqa: E402
from serving_worker import prompt_ids  # noqa: E402

from sparse_ssm import SparseSSMConfig  # noqa: E402


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_the_converter_gets_models_it_accepts_with_our_shape(arch):
    """convert_hf_to_gguf.py asserts d_inner = 2 d_model (and Mamba-2 heads dividing it), pads the
    vocabulary to its multiple (which must leave it equal to the embedding's rows), and takes its
    built-in GPT-NeoX vocabulary without tokenizer files."""
    cfg = serving_models.hf_config("130m", arch).to_dict()
    ours = SparseSSMConfig(**serving_models.ours_config("130m", "diagonal"))
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["state_size"]) == (ours.hidden_dim, ours.num_layers,
                                                                                ours.state_dim)
    assert cfg["vocab_size"] == ours.vocab_size and cfg["vocab_size"] % cfg["pad_vocab_size_multiple"] == 0
    assert cfg["tie_word_embeddings"] and ours.tie_embeddings
    if arch == "mamba1":
        assert cfg["intermediate_size"] == 2 * cfg["hidden_size"]
    else:
        assert cfg["num_heads"] * cfg["head_dim"] == 2 * cfg["hidden_size"] == ours.inner_dim
        assert (cfg["num_heads"], cfg["n_groups"]) == (ours.resolved_num_heads, ours.num_groups)


def test_our_two_structures_are_the_diagonal_and_blocks_of_8():
    diagonal = SparseSSMConfig(**serving_models.ours_config("130m", "diagonal"))
    block8 = SparseSSMConfig(**serving_models.ours_config("130m", "block8"))
    assert diagonal.is_diagonal and not block8.is_diagonal
    from sparse_ssm.ssm.hippo import block_size_for
    assert block_size_for(block8.state_dim, block8.sparsity_level) == 8


def test_converter_command_and_the_hf_model_written(tmp_path):
    hf_dir = serving_models.write_hf(tmp_path / "hf", "tiny", "mamba2")
    assert (hf_dir / "config.json").is_file() and not list(hf_dir.glob("tokenizer*"))
    command = serving_models.converter_command(tmp_path / "llama.cpp", hf_dir, tmp_path / "m.gguf", "q8_0")
    assert command[1].endswith("convert_hf_to_gguf.py") and command[2] == str(hf_dir)
    assert command[command.index("--outtype") + 1] == "q8_0"


def test_flags_dry_run_and_one_round_order():
    args = serving.parse_args(["--dry-run", "--archs", "mamba1,mamba2", "--gguf-types", "f32,q8_0"])
    assert (args.size, args.rounds, args.prompt_lengths) == ("tiny", 1, [8, 32])
    names = [name for name, _ in serving.engines(args)]
    assert names[:4] == ["ours_diagonal_fp32", "ours_block8_fp32", "ours_diagonal_int8", "ours_block8_int8"]
    assert names[4:] == ["mamba1_f32", "mamba2_f32", "mamba1_q8_0", "mamba2_q8_0"]
    assert serving.parse_args(["--archs", ""]).archs == []
    with pytest.raises(SystemExit):
        serving.parse_args(["--archs", "mamba3"])
    with pytest.raises(SystemExit):
        serving.parse_args(["--prompt-lengths", "512,long"])


def test_ratios_compare_equal_precision_only():
    m = lambda decode, prefill, rss: {"decode_tok_s": {"1": decode}, "prefill_tok_s": {"512": prefill},
                                      "peak_rss_gb": rss}
    summary = {"ours_diagonal_fp32": m(30, 1000, 1.0), "ours_diagonal_int8": m(60, 900, 0.4),
               "mamba1_f32": m(20, 500, 0.8), "mamba1_f16": m(40, 600, 0.5), "mamba1_q8_0": m(50, 450, 0.3)}
    rows = {(r["ours"], r["llama_cpp"]): r for r in serving.ratios(summary)}
    assert set(rows) == {("ours_diagonal_fp32", "mamba1_f32"), ("ours_diagonal_int8", "mamba1_q8_0")}
    assert rows["ours_diagonal_fp32", "mamba1_f32"]["decode"]["1"] == pytest.approx(1.5)
    assert rows["ours_diagonal_int8", "mamba1_q8_0"]["prefill"]["512"] == pytest.approx(2.0)


def test_medians_over_rounds_of_nested_metrics():
    runs = [{"a": 1.0, "b": {"1": 5.0}}, {"a": 3.0, "b": {"1": 1.0}}, {"a": 2.0, "b": {"1": 9.0}}]
    assert serving.medians(runs) == {"a": 2.0, "b": {"1": 5.0}}


def test_prompts_are_the_same_for_both_engines_and_real_tokens():
    assert prompt_ids(64, 0, 50280) == prompt_ids(64, 0, 50280) != prompt_ids(64, 0, 50280, row=1)
    assert max(prompt_ids(4096, 0, 50280)) < 50277 and max(prompt_ids(64, 0, 512)) < 512


def test_without_llama_cpp_python_it_says_how_to_install_it(tmp_path):
    code = ("import sys, runpy; sys.modules['llama_cpp'] = None; "
            f"sys.argv = ['serving.py', '--dry-run', '--cache', {str(tmp_path)!r}]; "
            f"runpy.run_path({str(ROOT / 'bench' / 'serving.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "pip install -e '.[llama-cpp]'" in done.stderr and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_dry_run_of_our_side_writes_results(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "serving.py"), "--dry-run", "--archs", "",
                           "--structures", "diagonal", "--weights", "int8", "--cache", str(tmp_path / "cache"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "serving.json").read_text())
    medians = result["median"]["ours_diagonal_int8"]
    assert medians["decode_tok_s"]["1"] > 0 and medians["prefill_tok_s"]["32"] > 0 and medians["peak_rss_gb"] > 0
    assert result["provenance"]["threads"] == 1 and "ours_diagonal" in result["provenance"]["model_configs"]
    assert "| ours_diagonal_int8 |" in (tmp_path / "out" / "serving.md").read_text()

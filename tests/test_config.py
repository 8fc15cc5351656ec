"""Config validation: every error names the key."""

import math
import subprocess
import sys

import pytest

from helpers import ROOT
from sparse_ssm import ConfigError, SparseSSMConfig, cli
from sparse_ssm.config import Config, load_yaml
from sparse_ssm.util.schema import parse_value


@pytest.mark.parametrize("data, message", [
    ({"hidden_dimm": 3}, r"model\.hidden_dimm: unknown key"),
    ({"state_dim": "16"}, r"model\.state_dim: expected int"),
    ({"use_parallel_scan": 1}, r"model\.use_parallel_scan: expected bool"),
    ({"dropout": 1.5}, r"model\.dropout: must be < 1"),
    ({"selective_param_class": "block"}, r"model\.selective_param_class: 'block' is not one of"),
    ({"hippo_init": "fourier", "state_dim": 15}, r"model\.hippo_init: 'fourier' needs an even state_dim"),
    ({"selective_param_class": "low_rank", "discretization": "zoh"}, r"model\.discretization: 'zoh' is not available"),
    ({"num_heads": 5}, r"model\.num_heads: must divide"),
    ({"sparsity_level": 1.0}, r"model\.sparsity_level"),
    ({"low_rank_rank": 500}, r"model\.low_rank_rank"),
    ({"eigenvalue_range": "signed", "sparsity_level": 0.5}, r"model\.eigenvalue_range: 'signed' applies to the diagonal"),
    ({"selective_param_class": "rotation", "state_dim": 7, "hippo_init": "legs"}, r"model\.state_dim: 'rotation' pairs"),
])
def test_invalid_model_config_names_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        SparseSSMConfig.from_dict(data)


def test_auto_discretization_is_exact_where_it_is_cheap():
    resolved = lambda **kw: SparseSSMConfig(state_dim=16, **kw).resolved_discretization
    assert resolved() == "zoh" and resolved(selective_param_class="rotation") == "zoh"
    assert resolved(selective_param_class="permutation") == "zoh"
    assert resolved(selective_param_class="householder") == "zoh"
    assert resolved(sparsity_level=0.5) == resolved(selective_param_class="dense") == "bilinear"
    assert resolved(sparsity_level=0.5, discretization="zoh") == "zoh"


def test_int_is_accepted_for_float_and_null_for_optional():
    config = SparseSSMConfig.from_dict({"dropout": 0, "num_heads": None})
    assert config.dropout == 0.0 and config.resolved_num_heads == 24


def test_shipped_configs_are_valid_in_every_section():
    paths = sorted((ROOT / "config").glob("*.yaml"))
    assert {"default_config.yaml", "small_cpu.yaml"} <= {p.name for p in paths}
    for path in paths:
        config = Config.load(path).to_dict()
        for section, values in load_yaml(path).items():          # every value of the file is the one in force
            for key, value in (values or {}).items():
                got = config[section][key]
                same = got == value or (isinstance(value, float) and math.isclose(got, value))
                assert same, (path.name, section, key)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  state_dimm: 4\n")
    assert cli.main(["inspect", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.state_dimm: unknown key") and err.count("\n") == 1


@pytest.mark.slow
def test_cli_inspect_checks_recurrent_decoding(tmp_path):
    """The inspect command's smoke test, in a fresh interpreter started in another directory."""
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "inspect", "--config",
                           str(ROOT / "config" / "small_cpu.yaml"), "--length", "24"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    diff = float(proc.stdout.split("max |logit diff| ")[1].split()[0])
    assert diff < 1e-4


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("5E+4", 5e4), ("2.5e-2", 0.025), (".5", 0.5), ("3.", 3.0)])
def test_floats_follow_yaml_1_2_in_files_and_set(tmp_path, text, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"optimizer:\n  learning_rate: {text}\n")
    assert Config.load(path).optimizer.learning_rate == value
    path.write_text("training:\n  seed: 3\n")
    assert Config.load(path, [f"optimizer.learning_rate={text}"]).optimizer.learning_rate == value


def test_set_values_keep_signs_ints_and_strings():
    assert parse_value("-2.5e-2") == -0.025 and parse_value("-.inf") == float("-inf") and parse_value("null") is None
    assert parse_value("1000") == 1000 and isinstance(parse_value("1000"), int) and parse_value("1e3x") == "1e3x"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_an_empty_config_file_is_refused(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="empty.yaml is empty: a config file holds sections"):
        load_yaml(path)


def test_a_key_given_twice_is_refused_with_its_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  hidden_dim: 32\n  state_dim: 8\n  hidden_dim: 64\n")
    assert cli.main(["inspect", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cfg}, line 4: key 'hidden_dim' is given twice (also on line 2)")
    assert "remove one" in err and err.count("\n") == 1
    cfg.write_text("model: {}\ntraining: {}\nmodel: {}\n")
    with pytest.raises(ConfigError, match="line 3: key 'model' is given twice"):
        Config.load(cfg)
    cfg.write_text("model: {}\n")
    with pytest.raises(ConfigError, match="key 'a' is given twice"):
        Config.load(cfg, ["training.seed={a: 1, a: 2}"])
    cfg.write_text("base: &b {hidden_dim: 32}\nmodel:\n  <<: *b\n  hidden_dim: 64\n")   # a merge key may be overridden
    assert load_yaml(cfg)["model"] == {"hidden_dim": 64}

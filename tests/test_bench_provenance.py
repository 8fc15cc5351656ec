"""Results files of the benchmarks record what produced them, and a resumed grid refuses cells that
another code version or model config made unless told to mix them."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import state_tracking  # noqa: E402
from common import write_results  # noqa: E402
from provenance import code_version, mixed_records, provenance  # noqa: E402

from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM  # noqa: E402


def test_results_file_records_commit_versions_machine_and_model_configs(tmp_path):
    model = SparseSSMForCausalLM(SparseSSMConfig(vocab_size=32, hidden_dim=16, state_dim=4, num_layers=1)).eval()
    write_results(tmp_path, "demo", {"rows": []}, ["| a |"], provenance({"ours": model}, seeds=[0], loss_path="fused"))
    prov = json.loads((tmp_path / "demo.json").read_text())["provenance"]
    assert len(prov["git"]["commit"]) == 40 and isinstance(prov["git"]["dirty"], bool)
    assert prov["versions"]["torch"] and prov["versions"]["transformers"] and prov["versions"]["python"]
    assert prov["machine"]["cpu"] and prov["machine"]["cores"] >= 1 and prov["torch_threads"] >= 1
    assert prov["seeds"] == [0] and prov["loss_path"] == "fused" and "malloc_env" in prov
    assert prov["models"]["ours"]["config"] == json.loads(json.dumps(model.config.to_dict()))
    assert prov["models"]["ours"]["mode"] == "eval"
    md = (tmp_path / "demo.md").read_text()
    assert md.startswith("| a |") and prov["code_version"][:12] in md


def test_mixed_records_names_other_code_versions_and_configs():
    now = code_version()
    records = [{"name": "same", "code_version": now, "config": {"x": 1}},
               {"name": "old code", "code_version": "0123abc", "config": {"x": 1}},
               {"name": "other config", "code_version": now, "config": {"x": 2}},
               {"name": "unrecorded"}]
    found = mixed_records(records, now, lambda r: (r["name"], {"x": 1}))
    assert [f.split(":")[0] for f in found] == ["old code", "other config", "unrecorded"]
    assert "0123abc" in found[0] and "differs in x" in found[1]


def write_grid(path: Path, setup: dict, version: str):
    config = state_tracking.cell_config("parity", "diagonal", setup)[0].to_dict()
    cell = {"task": "parity", "variant": "diagonal", "seed": 0, "code_version": version, "config": config}
    path.write_text(json.dumps({"setup": setup, "cells": [cell]}))


def test_resumed_state_tracking_grid_refuses_cells_of_another_commit(tmp_path):
    setup = {"steps": 10, "batch": 32, "lr": 3e-3, "length": 4, "multiples": [1, 4, 16], "threads": 1}
    path = tmp_path / "state_tracking.json"
    write_grid(path, setup, code_version())
    assert len(state_tracking.load_cells(path, setup)) == 1          # same code: resumed
    write_grid(path, setup, "0123abc")
    with pytest.raises(SystemExit) as refused:
        state_tracking.load_cells(path, setup)
    assert "parity/diagonal/seed 0" in str(refused.value) and "--allow-mixed" in str(refused.value)
    assert len(state_tracking.load_cells(path, setup, allow_mixed=True)) == 1

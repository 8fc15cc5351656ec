"""bench/chomsky_fade.py: the test-time interventions make exactly the named parts of the reflections
exact and leave the model as it was once closed; a dry run writes every intervention's accuracies with
provenance and resumes."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import chomsky_fade  # noqa: E402
from sparse_ssm.model.lm import SparseSSMForCausalLM  # noqa: E402
from sparse_ssm.ssm.structures.block import UNIT_MAGNITUDE_RAW  # noqa: E402
from sparse_ssm.ssm.structures.householder import EXACT_REFLECTION_LOGIT, HouseholderStructure  # noqa: E402
from sparse_ssm.tasks.training import task_model_config  # noqa: E402


def test_exact_parts_replace_only_the_decays_or_only_the_write_strengths():
    N, r = 4, 2
    structure = HouseholderStructure(N, r, closed=True, reflection_input="delta")
    raw, dt = torch.randn(3, 5, structure.raw_size), torch.rand(3, 5) + 0.1
    logits = lambda x: x[..., N:].reshape(3, 5, r, N + 1)[..., N]
    keys = lambda x: x[..., N:].reshape(3, 5, r, N + 1)[..., :N]
    decays = chomsky_fade.exact_parts(raw, dt, structure, decays=True, writes=False)
    assert torch.equal(decays[..., :N], torch.full_like(raw[..., :N], UNIT_MAGNITUDE_RAW))
    assert torch.equal(decays[..., N:], raw[..., N:])
    writes = chomsky_fade.exact_parts(raw, dt, structure, decays=False, writes=True)
    assert torch.equal(writes[..., :N], raw[..., :N]) and torch.equal(keys(writes), keys(raw))
    assert torch.equal(logits(writes), torch.where(logits(raw) > 0, EXACT_REFLECTION_LOGIT, -EXACT_REFLECTION_LOGIT))
    assert torch.equal(chomsky_fade.exact_parts(raw, dt, structure, True, True), structure.snap_to_grid(raw, dt, 2))


def test_an_intervention_changes_the_hybrids_outputs_while_open_and_not_after():
    config = task_model_config("householder_delta_hybrid", 24, 4, hidden_dim=32)
    torch.manual_seed(0)
    model = SparseSSMForCausalLM(config).eval()
    tokens = torch.randint(0, 4, (2, 16))
    with torch.no_grad():
        before = model(tokens).logits
        with chomsky_fade.intervention(model, decays=True, writes=False):
            decays_one = model(tokens).logits
        with chomsky_fade.intervention(model, decays=False, writes=False):
            untouched = model(tokens).logits
        after = model(tokens).logits
    assert not torch.allclose(decays_one, before, atol=1e-4)
    assert torch.equal(untouched, before) and torch.equal(after, before)


def test_dry_run_scores_every_intervention_on_the_same_model_and_resumes(tmp_path, capsys):
    argv = ["--task", "parity-check", "--steps", "5", "--seeds", "0", "--train-lengths", "3-8",
            "--test-buckets", "8,12,16", "--test-sequences", "16", "--set", "hidden_dim=32", "--out", str(tmp_path)]
    chomsky_fade.main(argv)
    data = json.loads((tmp_path / "chomsky_fade.json").read_text())
    (cell,) = data["cells"]
    assert set(cell["accuracy"]) == set(chomsky_fade.INTERVENTIONS)
    assert all(set(acc) == {"8-12", "12-16"} for acc in cell["accuracy"].values())
    assert cell["config"]["hidden_dim"] == 32 and data["provenance"]["git"]["commit"]
    md = (tmp_path / "chomsky_fade.md").read_text()
    assert "| writes exact |" in md and "Produced by" in md
    capsys.readouterr()
    chomsky_fade.main(argv)
    assert "seed 0:" not in capsys.readouterr().out
    assert len(json.loads((tmp_path / "chomsky_fade.json").read_text())["cells"]) == 1


def test_a_variant_without_reflections_or_a_bad_key_value_is_refused_before_training(tmp_path):
    with pytest.raises(SystemExit, match="diagonal has no Householder layer"):
        chomsky_fade.main(["--task", "parity-check", "--variant", "diagonal", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="error: .*reflection_decay: false holds every decay at 1"):
        chomsky_fade.main(["--task", "parity-check", "--variant", "householder", "--set", "reflection_decay=false",
                           "--out", str(tmp_path)])
    assert not (tmp_path / "chomsky_fade.json").exists()

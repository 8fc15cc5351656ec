"""The auto_map files of an exported model: `trust_remote_code=True` loads our classes through
them without `import sparse_ssm` first.  They import the installed package (no copy of its
source), so what runs is what `pip install sparse-ssm` installed."""

from __future__ import annotations

from pathlib import Path

REMOTE_CODE = {
    "configuration_sparse_ssm.py": ('"""auto_map target: the config class of sparse-ssm (pip install sparse-ssm)."""\n\n'
                                    "from sparse_ssm.hf.config import SparseSSMHFConfig  # noqa: F401\n"),
    "modeling_sparse_ssm.py": ('"""auto_map target: the model class of sparse-ssm (pip install sparse-ssm)."""\n\n'
                               "from sparse_ssm.hf.modeling import SparseSSMHFForCausalLM  # noqa: F401\n"),
}
AUTO_MAP = {"AutoConfig": "configuration_sparse_ssm.SparseSSMHFConfig",
            "AutoModelForCausalLM": "modeling_sparse_ssm.SparseSSMHFForCausalLM"}


def write_remote_code(folder: str | Path):
    for name, source in REMOTE_CODE.items():
        (Path(folder) / name).write_text(source)

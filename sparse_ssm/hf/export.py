"""A checkpoint as a Hugging Face model directory:

    config.json               model_type "sparse_ssm", every `model` key, eos/pad ids, auto_map
    model.safetensors         the weights (keys `model.<our key>`; the tied LM head left out)
    generation_config.json
    configuration_sparse_ssm.py, modeling_sparse_ssm.py   the auto_map targets (they import sparse_ssm)
    tokenizer.json, tokenizer_config.json    our BPE as a `PreTrainedTokenizerFast`

so that `AutoModelForCausalLM.from_pretrained(dir)` (after `import sparse_ssm.hf`, or with
`trust_remote_code=True` and sparse-ssm installed) and `AutoTokenizer.from_pretrained(dir)` load it.
Nothing reaches the hub; `model.push_to_hub(...)` on the loaded model shares it."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from ..data.tokenizer import EOS, PAD, CompactTokenizer, pad_id_of
from ..generate.loading import load_checkpoint
from ..model import SparseSSMForCausalLM
from ..model.checkpoint import resolve_checkpoint
from ..util.errors import CheckpointError, OutputError
from ..util.files import listing, output_folder, overlaps, read_marker
from .modeling import SparseSSMHFForCausalLM

COMMAND = "export"          # the name in the marker of the folders it writes


def hf_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """Our `tokenizers.Tokenizer` as transformers' fast tokenizer (end-of-text is eos, <|pad|> pads)."""
    if isinstance(tokenizer, CompactTokenizer):
        raise CheckpointError("this checkpoint reads a teacher's tokenizer through a compacted vocabulary "
                              "(vocab_map.json), which a Hugging Face tokenizer.json cannot express; export a model "
                              "trained with its own tokenizer, or serve this one with `python main.py serve`")
    pad = PAD if tokenizer.token_to_id(PAD) is not None else EOS
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=pad)


def check_export_output(output: str | Path, inputs, overwrite: bool = False) -> Path:
    """Refuse an export folder that overlaps one of `inputs` ({label: path} of the model directory
    and the checkpoint it reads; even with `overwrite`), that is a file, or that holds files an
    export did not write (unless `overwrite`)."""
    output = Path(output)
    for label, source in inputs.items():
        if overlaps(output, source):
            raise OutputError(f"--output {output} overlaps {label} {source}, which export reads: writing there could "
                              f"destroy the training run; choose a folder outside it, e.g. "
                              f"hf/{Path(source).resolve().name}")
    if output.exists() and not output.is_dir():
        raise OutputError(f"--output {output} is a file; an export is a folder: give a folder path")
    others = [p.name for p in output.iterdir()] if output.is_dir() else []
    if others and not overwrite and (read_marker(output) or {}).get("command") != COMMAND:
        raise OutputError(f"--output {output} holds files an export did not write ({listing(others)}): pass "
                          f"--overwrite to export into it (files of the same names are replaced, the others kept), "
                          f"or choose a new or empty folder")
    return output


def export_model(model: SparseSSMForCausalLM, tokenizer, output: str | Path) -> Path:
    """Write `model` and its tokenizer as a Hugging Face model directory `output`: its files replace
    those of an earlier export there, other files are kept (`util.files.output_folder`; check the
    folder first with `check_export_output`)."""
    fast = hf_tokenizer(tokenizer)
    hf = SparseSSMHFForCausalLM.from_model(model.float().eval(), eos_token_id=tokenizer.token_to_id(EOS),
                                           pad_token_id=pad_id_of(tokenizer))
    output = Path(output)
    with output_folder(output, COMMAND) as tmp:
        hf.save_pretrained(tmp)
        fast.save_pretrained(tmp)
    return output


def export_checkpoint(model_dir: str | Path, which: str | None, output: str | Path, overwrite: bool = False) -> Path:
    """The checkpoint `which` (best | latest | STEP | PATH) of a training output directory as a
    Hugging Face model directory `output` (see `check_export_output` for the folders it refuses)."""
    checkpoint = resolve_checkpoint(model_dir, which)
    check_export_output(output, {"the model directory": model_dir, "the checkpoint": checkpoint}, overwrite)
    loaded = load_checkpoint(model_dir, str(checkpoint), "cpu")
    return export_model(loaded.model, loaded.tokenizer, output)

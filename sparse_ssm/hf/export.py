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
from ..util.errors import CheckpointError
from ..util.files import atomic_directory
from .modeling import SparseSSMHFForCausalLM

def hf_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """Our `tokenizers.Tokenizer` as transformers' fast tokenizer (end-of-text is eos, <|pad|> pads)."""
    if isinstance(tokenizer, CompactTokenizer):
        raise CheckpointError("this checkpoint reads a teacher's tokenizer through a compacted vocabulary "
                              "(vocab_map.json), which a Hugging Face tokenizer.json cannot express; export a model "
                              "trained with its own tokenizer, or serve this one with `python main.py serve`")
    pad = PAD if tokenizer.token_to_id(PAD) is not None else EOS
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=pad)


def export_model(model: SparseSSMForCausalLM, tokenizer, output: str | Path) -> Path:
    """Write `model` and its tokenizer as a Hugging Face model directory `output` (replaced as a whole)."""
    fast = hf_tokenizer(tokenizer)
    hf = SparseSSMHFForCausalLM.from_model(model.float().eval(), eos_token_id=tokenizer.token_to_id(EOS),
                                           pad_token_id=pad_id_of(tokenizer))
    output = Path(output)
    with atomic_directory(output) as tmp:
        hf.save_pretrained(tmp)
        fast.save_pretrained(tmp)
    return output


def export_checkpoint(model_dir: str | Path, which: str | None, output: str | Path) -> Path:
    """The checkpoint `which` (best | latest | STEP | PATH) of a training output directory as a
    Hugging Face model directory."""
    loaded = load_checkpoint(model_dir, which, "cpu")
    return export_model(loaded.model, loaded.tokenizer, output)

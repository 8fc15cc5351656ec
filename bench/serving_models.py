"""The models `bench/serving.py` compares, built once and cached under a directory it is given:

- ours: random-weight `SparseSSMForCausalLM` checkpoints (config.yaml + model.safetensors) in the
  default config's shape scaled to ~130 M parameters (hidden 768, 24 layers without FFN, state 16,
  vocab 50,280), diagonal A and block-8 A; `load_model(..., weights)` makes fp32 / int8 of them;
- llama.cpp: random-weight `transformers` MambaForCausalLM / Mamba2ForCausalLM of the same width,
  depth, state and vocabulary (Mamba-2: head_dim 64, so 24 heads of d_inner = 2 * 768; one group),
  saved without tokenizer files, so that the converter takes its built-in GPT-NeoX vocabulary (the
  one state-spaces/mamba-130m uses; no pre-tokenizer hash to match, and the bench feeds token ids),
  and converted to GGUF by `convert_hf_to_gguf.py` from the llama.cpp sources that the installed
  llama-cpp-python's sdist vendors (fetched with `pip download`, unpacked under the cache).

    paths = prepare(cache, sizes, gguf_types, log)     # {"ours_diagonal": dir, "mamba1_f32": file, ...}
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

VOCAB = 50280     # state-spaces/mamba-130m's (GPT-NeoX's 50,277 tokens padded to a multiple of 8)
SIZES = {
    # ~130 M: the default config's width, the FFN dropped and the depth doubled to 24 layers (the shape
    # of Mamba-130m, so that the llama.cpp models have the same layers as ours); state 16 as theirs
    "130m": dict(vocab_size=VOCAB, hidden_dim=768, num_layers=24, state_dim=16),
    "tiny": dict(vocab_size=512, hidden_dim=64, num_layers=2, state_dim=16),   # --dry-run
}
# the two structures of A: sparsity 0.9 at state 16 is the diagonal (blocks of 1), 0.5 is blocks of 8
# (the block size the default config's sparsity 0.9 gives at its state 128)
STRUCTURES = {"diagonal": 0.9, "block8": 0.5}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-gpt-neox.gguf")


def ours_config(size: str, structure: str) -> dict:
    """The `SparseSSMConfig` keys of our model at `size` with A `structure`."""
    return dict(SIZES[size], ffn_dim=0, max_seq_len=8192, dropout=0.0, selective_param_class="sparse",
                sparsity_level=STRUCTURES[structure])


def hf_config(size: str, arch: str):
    """The transformers config of the llama.cpp side: arch "mamba1" or "mamba2" (the converter's
    own checks: d_inner = 2 * d_model; Mamba-2 heads of 64; the vocabulary padded to a multiple of
    8 for both, so that it equals the embedding's rows)."""
    from transformers import Mamba2Config, MambaConfig
    s = SIZES[size]
    common = dict(vocab_size=s["vocab_size"], hidden_size=s["hidden_dim"], num_hidden_layers=s["num_layers"],
                  state_size=s["state_dim"], expand=2, conv_kernel=4, tie_word_embeddings=True,
                  pad_vocab_size_multiple=8)
    if arch == "mamba1":
        return MambaConfig(**common, intermediate_size=2 * s["hidden_dim"])
    return Mamba2Config(**common, head_dim=64, num_heads=2 * s["hidden_dim"] // 64, n_groups=1)


def write_ours(folder: Path, config: dict, seed: int = 0) -> Path:
    """A random checkpoint of our model (config.yaml with the model section, model.safetensors)."""
    import torch
    import yaml

    from sparse_ssm import SparseSSMConfig, SparseSSMForCausalLM
    from sparse_ssm.model.checkpoint import WEIGHTS, save_weights, weights_of
    torch.manual_seed(seed)
    model = SparseSSMForCausalLM(SparseSSMConfig(**config))
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / WEIGHTS, weights_of(model))
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": model.config.to_dict()}))
    return folder


def write_hf(folder: Path, size: str, arch: str, seed: int = 0) -> Path:
    """A random transformers Mamba / Mamba-2 saved with save_pretrained (no tokenizer files)."""
    import torch
    from transformers import Mamba2ForCausalLM, MambaForCausalLM
    torch.manual_seed(seed)
    cls = MambaForCausalLM if arch == "mamba1" else Mamba2ForCausalLM
    cls(hf_config(size, arch)).save_pretrained(folder)
    return folder


def converter_dir(cache: Path, log=print) -> Path:
    """The llama.cpp sources' converter (convert_hf_to_gguf.py, conversion/, gguf-py/, the GPT-NeoX
    vocabulary) of the installed llama-cpp-python's version, unpacked under `cache` from its sdist
    (downloaded with pip the first time)."""
    version = metadata.version("llama-cpp-python")
    target = cache / f"llama.cpp-{version}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    sdist = cache / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        log(f"downloading the llama-cpp-python {version} sdist (its llama.cpp sources hold the converter)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(cache)], check=True)
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                   and any(m.name[len(prefix):].startswith(f) for f in CONVERTER_FILES)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(target, members=members, filter="data")
    return target


def converter_command(converter: Path, hf_dir: Path, outfile: Path, outtype: str) -> list[str]:
    """The command that converts a saved transformers model to a GGUF of `outtype`."""
    return [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(outfile),
            "--outtype", outtype]


def prepare(cache: Path, size: str, gguf_types, archs=("mamba1", "mamba2"), structures=tuple(STRUCTURES),
            log=print) -> dict[str, Path]:
    """Build (or find in `cache`) every model the bench runs: name -> checkpoint dir or GGUF file.
    Names: "ours_<structure>", "<arch>_<gguf type>"."""
    root = cache / size
    paths = {}
    for structure in structures:
        folder = root / f"ours_{structure}"
        if not (folder / "config.yaml").is_file():
            log(f"writing our {structure} checkpoint to {folder}")
            write_ours(folder, ours_config(size, structure))
        paths[f"ours_{structure}"] = folder
    for arch in archs if gguf_types else ():
        hf_dir = root / f"hf_{arch}"
        if not (hf_dir / "config.json").is_file():
            log(f"writing a random transformers {arch} to {hf_dir}")
            write_hf(hf_dir, size, arch)
        for outtype in gguf_types:
            outfile = root / f"{arch}-{outtype}.gguf"
            if not outfile.is_file():
                log(f"converting {hf_dir.name} to {outfile.name}")
                partial = outfile.with_suffix(".partial")
                done = subprocess.run(converter_command(converter_dir(cache, log), hf_dir, partial, outtype),
                                      capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"convert_hf_to_gguf.py failed on {hf_dir}:\n{done.stderr[-3000:]}")
                partial.rename(outfile)
            paths[f"{arch}_{outtype}"] = outfile
    return paths


def describe(paths: dict[str, Path]) -> dict:
    """The configs behind the prepared models, for the provenance: ours' model sections, the
    transformers configs, and each GGUF's size."""
    import yaml
    out = {}
    for name, path in paths.items():
        if path.is_dir() and (path / "config.yaml").is_file():
            out[name] = yaml.safe_load((path / "config.yaml").read_text())["model"]
        else:
            hf = json.loads((path.parent / f"hf_{name.split('_')[0]}" / "config.json").read_text())
            out[name] = {"gguf": path.name, "bytes": path.stat().st_size, "hf_config": hf}
    return out

"""Reading a model.safetensors into a model with one copy of its weights in memory.

`TensorsOnDemand` reads the file with plain reads (JSON header, raw bytes: no code runs, no
pickle), a block of rows at a time into one small reused buffer; `empty_model` allocates a model
without writing its parameters (their pages stay untouched, so take no memory); `fill_parameters`
then reads each tensor into its parameter block by block (cast to the dtype asked for), so that
the process holds the loaded weights once, plus one ~1 MB block.  Where the peaks came from
before (130 M diagonal model, fp32): an initialised model (0.5 GB) plus `load_file`'s copy (0.5 GB);
int8 built on the meta device: its initialisation runs through torch._refs, which imports
torch._dynamo (+0.17 GB of modules); a whole embedding read to check it (+0.15 GB).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from unittest import mock

import torch
import torch.nn as nn

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
ELEMENTS_AT_ONCE = 1 << 18                     # a block of rows of about this many elements (1 MB of float32)
# the random initialisers that nn.Linear / nn.Embedding / our layers call while being built
_INITIALISERS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "trunc_normal_", "orthogonal_")


class TensorsOnDemand:
    """Blocks of rows of the tensors of a safetensors file, read with plain reads into one
    buffer when each is asked for: a block is valid until another is read (no mapping of the
    file, whose pages would stay resident).  The tied LM head is the embedding.  The format: an
    8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}} and the
    data; any inconsistency raises ValueError.  `nonfinite`: the floating-point tensors in which a
    read met NaN or inf (checked on every block read)."""

    def __init__(self, file, tie_embeddings: bool):
        self.file = file
        size = int.from_bytes(file.read(8), "little")
        self.entries = json.loads(file.read(size))
        self.entries.pop("__metadata__", None)
        self.data_start, file_size = 8 + size, os.fstat(file.fileno()).st_size
        for name, e in self.entries.items():
            begin, end = e["data_offsets"]
            itemsize = torch.empty(0, dtype=_DTYPES[e["dtype"]]).element_size()
            if not 0 <= begin <= end <= file_size - self.data_start or end - begin != math.prod(e["shape"]) * itemsize:
                raise ValueError(f"tensor {name}: data offsets {begin}..{end} do not fit its shape or the file")
        self.buffer = bytearray(0)
        self.last = None                                       # (name, start, stop) of the rows in the buffer
        self.nonfinite: list[str] = []
        self.aliases = {"lm_head.weight": "embed.weight"} if (
            tie_embeddings and "lm_head.weight" not in self.entries and "embed.weight" in self.entries) else {}

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (the buffer grows to the largest read)."""
        name = self.aliases.get(name, name)
        e = self.entries[name]
        dtype, shape = _DTYPES[e["dtype"]], e["shape"] or [1]
        row_bytes = math.prod(shape[1:]) * torch.empty(0, dtype=dtype).element_size()
        begin, size = e["data_offsets"][0] + start * row_bytes, (stop - start) * row_bytes
        if size == 0:
            return torch.empty([stop - start, *shape[1:]], dtype=dtype)
        fresh = self.last != (name, start, stop)
        if fresh:
            if len(self.buffer) < size:
                self.buffer = None                                  # the old one freed before the new one
                self.buffer = bytearray(size)
            self.file.seek(self.data_start + begin)
            if self.file.readinto(memoryview(self.buffer)[:size]) != size:
                raise ValueError(f"tensor {name}: the file ends inside its data")
            self.last = (name, start, stop)
        count = size // (row_bytes // max(1, math.prod(shape[1:])))
        block = torch.frombuffer(self.buffer, dtype=dtype, count=count).reshape(stop - start, *shape[1:])
        if fresh and block.is_floating_point() and name not in self.nonfinite and not bool(torch.isfinite(block).all()):
            self.nonfinite.append(name)
        return block

    def meta(self) -> dict[str, torch.Tensor]:
        """Every tensor (the tied head's alias included, as the same object) as a meta tensor of its
        shape and dtype: what checking the names and shapes needs, without reading any data."""
        out = {name: torch.empty(e["shape"], dtype=_DTYPES[e["dtype"]], device="meta") for name, e in self.entries.items()}
        out.update({alias: out[name] for alias, name in self.aliases.items()})
        return out


@contextmanager
def _no_random_init():
    """torch.nn.init's random initialisers do nothing inside (modules built here keep the
    uninitialised memory of torch.empty; not thread-safe: it patches the module)."""
    with mock.patch.multiple(nn.init, **{name: lambda tensor, *args, **kwargs: tensor for name in _INITIALISERS}):
        yield


def empty_model(build):
    """`build()` (a model constructor that skips its own initialisation) with nn.init's random
    initialisers off: the parameters are allocated, never written; the large ones (their own
    memory maps) take no resident memory until written, or ever if replaced first (int8)."""
    with _no_random_init():
        return build()


def fill_parameters(model: nn.Module, rows, dtype: torch.dtype | None = None):
    """Read every parameter of `model` (each shared one once) from rows(name, start, stop) (rows of
    the stored tensor `name`), a block of ~ELEMENTS_AT_ONCE elements at a time; floating-point
    ones become `dtype` (None: the parameter's own, read in place) and a parameter of another dtype
    is replaced by a new tensor (its old memory freed)."""
    for name, param in model.named_parameters():
        target_dtype = dtype if dtype is not None and param.is_floating_point() else param.dtype
        in_place = target_dtype == param.dtype
        target = param.detach() if in_place else torch.empty(param.shape, dtype=target_dtype)
        flat = target.view(target.shape[0] if target.dim() else 1, -1)
        at_once = max(1, ELEMENTS_AT_ONCE // max(1, flat.shape[1]))
        for start in range(0, flat.shape[0], at_once):
            stop = min(start + at_once, flat.shape[0])
            flat[start:stop].copy_(rows(name, start, stop).reshape(stop - start, -1))
        if not in_place:
            param.data = target

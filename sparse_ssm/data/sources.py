"""Documents of each dataset type, and a deterministic train / validation / test split.

Dataset types (`dataset.type`):
- ``custom``: local .txt/.md (UTF-8, one document per file), .jsonl/.json (JSON Lines, or a JSON
  list of records) and .parquet files (one document per record, field `dataset.text_field`), or
  a folder of them.  A file that cannot be read is reported with its line and what is wrong.
- ``synthetic``: the JSON file of `create-synthetic`: a list of records with a `text` field, or
  an object with such a list under `records`.
- ``wikitext103``: `Salesforce/wikitext`, config `wikitext-103-raw-v1`, its own train /
  validation / test splits; with `data_path` the same schema from local files (a folder with
  train*/validation*/test* parquet, jsonl or text files).
- ``pile``: an uncopyrighted Pile mirror (`monology/pile-uncopyrighted`), streamed, the first
  `dataset.max_documents` documents (default 100,000); with `data_path`, local files.

Split (types without their own splits): documents are cut at line breaks into segments of at
most 8,192 characters; a permutation seeded by `dataset.split_seed` sends `test_split` of the
segments to test, `val_split` to validation and the rest to train.  The split does not depend on
the tokenizer, so the tokenizer trains on the training text only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..util.errors import DataError
from .config import DatasetConfig

SEGMENT_CHARS = 8192
TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSON_SUFFIXES = {".json", ".jsonl"}
SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | {".parquet"}
KINDS = "text files (.txt, .text, .md), record files (.jsonl, .json, .parquet) or a folder of them"
HUB = {"wikitext103": ("Salesforce/wikitext", "wikitext-103-raw-v1"), "pile": ("monology/pile-uncopyrighted", None)}


def _check_suffix(path: Path):
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; the data must be {KINDS}")


def data_files(path: Path) -> list[Path]:
    if path.is_file():
        _check_suffix(path)
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith("."))
    if not files:
        others = sorted({p.suffix or "(no suffix)" for p in path.rglob("*") if p.is_file()})
        raise DataError(f"{path} holds no .txt/.text/.md/.json/.jsonl/.parquet files"
                        + (f" (only {', '.join(others)})" if others else " (it is empty)"))
    return files


def _decode(path: Path, text_file: bool) -> str:
    """A file's UTF-8 text (a text file's with universal newlines), or a DataError naming the line."""
    data = path.read_bytes()
    if text_file and b"\0" in data:
        line = data[:data.index(b"\0")].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: a NUL byte: a binary file (or UTF-16 text), not UTF-8 text; remove it "
                        f"from the data or save it as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8 text, "
                        f"or remove it from the data") from None
    return text.replace("\r\n", "\n").replace("\r", "\n") if text_file else text


def _json_records(path: Path) -> list[tuple[str, object]]:
    """(where, record) of a .jsonl file (JSON Lines) or a .json file (a list of records, or JSON Lines)."""
    text = _decode(path, text_file=False)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":          # (a .json file of JSON Lines is read line by line below)
                raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        else:
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a list of records (JSON objects), got a {type(data).__name__}")
            return [(f"{path}: record {i + 1}", r) for i, r in enumerate(data)]
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}: line {number}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {number}: not valid JSON ({e.msg}, column {e.colno}); every line of a "
                            f"JSON Lines file is one record (a JSON object)") from None
    return records


def _record_texts(path: Path, field: str) -> list:
    """The `field` of every record of a .jsonl / .json / .parquet file (None where a record lacks it)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
            column = pq.read_table(path, columns=[field]).column(field) if field in names else None
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for damaged files
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {str(e)[:200]})") from None
        if column is None:
            raise DataError(f"{path}: records have no field {field!r} (fields: {names}); set dataset.text_field")
        if not (str(column.type).startswith(("string", "large_string")) or column.null_count == len(column)):
            raise DataError(f"{path}: field {field!r} holds {column.type}, not text; set dataset.text_field")
        return column.to_pylist()
    texts, fields = [], set()
    for where, record in _json_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object (a record with a {field!r} field), got a "
                            f"{type(record).__name__}")
        fields.update(record)
        value = record.get(field)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: field {field!r} is not text ({type(value).__name__} {value!r:.40})")
        texts.append(value)
    if texts and field not in fields:
        raise DataError(f"{path}: records have no field {field!r} (fields: {sorted(fields)}); set dataset.text_field")
    return texts


def read_documents(files: list[Path], text_field: str, limit: int | None = None) -> list[str]:
    """Non-empty documents of local files (see the module docstring): the text files first, then
    the JSON, then the parquet files, each group in the order given."""
    for f in files:
        _check_suffix(f)
    docs: list[str] = [_decode(f, text_file=True) for f in files if f.suffix in TEXT_SUFFIXES]
    for group in ([f for f in files if f.suffix in JSON_SUFFIXES], [f for f in files if f.suffix == ".parquet"]):
        for f in group:
            docs.extend(_record_texts(f, text_field))
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    return docs[:limit] if limit else docs


def _synthetic_documents(path: Path, text_field: str) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); expected the file written by create-synthetic") from None
    records = data.get("records") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a list of records (or an object with 'records'), got {type(data).__name__}")
    docs = [r.get(text_field) for r in records if isinstance(r, dict)]
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    if not docs:
        raise DataError(f"{path}: no record has a non-empty {text_field!r} field")
    return docs


def _hub(dataset_type: str, split: str, limit: int | None):
    import datasets

    name, config = HUB[dataset_type]
    try:
        if dataset_type == "pile":
            stream = datasets.load_dataset(name, split=split, streaming=True)
            return [row["text"] for _, row in zip(range(limit or 100_000), stream)]
        return datasets.load_dataset(name, config, split=split)["text"]
    except Exception as e:  # noqa: BLE001 - offline errors come in many classes
        raise DataError(f"could not load {name}{'/' + config if config else ''} from the Hugging Face hub "
                        f"({type(e).__name__}: {str(e)[:200]}). Without network access, download it once "
                        f"elsewhere and set dataset.data_path to local files with a 'text' field.") from None


def _segments(docs: list[str]) -> list[str]:
    out = []
    for doc in docs:
        if len(doc) <= SEGMENT_CHARS:
            out.append(doc)
            continue
        piece = []
        size = 0
        for line in doc.splitlines(keepends=True):
            if size + len(line) > SEGMENT_CHARS and piece:
                out.append("".join(piece))
                piece, size = [], 0
            piece.append(line)
            size += len(line)
        if piece:
            out.append("".join(piece))
    return out


def split_documents(docs: list[str], val_split: float, test_split: float, seed: int) -> dict[str, list[str]]:
    """Deterministic train / validation / test split of the segments of `docs`."""
    segs = _segments(docs)
    order = list(range(len(segs)))
    random.Random(seed).shuffle(order)
    n_test = round(test_split * len(segs))
    n_val = round(val_split * len(segs))
    if (test_split and not n_test) or (val_split and not n_val) or len(segs) - n_test - n_val < 1:
        raise DataError(f"only {len(segs)} text segments: too few for val_split {val_split} and test_split "
                        f"{test_split}; add data or lower the splits")
    pick = lambda idx: [segs[i] for i in sorted(idx)]
    return {"test": pick(order[:n_test]), "validation": pick(order[n_test:n_test + n_val]),
            "train": pick(order[n_test + n_val:])}


def load_splits(cfg: DatasetConfig) -> dict[str, list[str]]:
    """Documents of the train / validation / test splits for a dataset config."""
    path = Path(cfg.data_path) if cfg.data_path else None
    if path is not None and not path.exists():
        if "shakespeare" in str(path):
            hint = " For the embedded corpus run: python -m sparse_ssm.data.corpus data/shakespeare (or make demo)."
        elif cfg.type == "synthetic":
            hint = (" dataset.type 'synthetic' reads a JSON list of records with a 'text' field (what create-synthetic "
                    "writes); point dataset.data_path at one, use your own files with dataset.type 'custom', or "
                    "train on the embedded corpus with config/small_cpu.yaml.")
        else:
            hint = ""
        raise DataError(f"dataset.data_path {path} does not exist.{hint}")
    if cfg.type == "wikitext103":
        if path is None:
            splits = {s: ["\n".join(_hub("wikitext103", s, None))] for s in ("train", "validation", "test")}
        else:
            files = data_files(path)
            splits = {}
            for s in ("train", "validation", "test"):
                group = [f for f in files if f.name.startswith(s)]
                if not group:
                    raise DataError(f"{path}: no {s}* file; a local wikitext folder needs train*, validation* "
                                    f"and test* files with a 'text' field")
                splits[s] = ["".join(line if line.endswith("\n") else line + "\n"
                                     for line in read_documents(group, cfg.text_field))]
        return splits
    if cfg.type == "synthetic":
        docs = _synthetic_documents(path, cfg.text_field)
    elif cfg.type == "pile" and path is None:
        docs = _hub("pile", "train", cfg.max_documents)
    else:
        docs = read_documents(data_files(path), cfg.text_field, cfg.max_documents)
    if not docs:
        raise DataError(f"{path}: no non-empty documents (every file or record is empty or blank)")
    return split_documents(docs, cfg.val_split, cfg.test_split, cfg.split_seed)



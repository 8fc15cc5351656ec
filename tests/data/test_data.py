"""Dataset types on local files, the split, the tokenizer and the cache."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import SENTENCES, make_text
from sparse_ssm import cli
from sparse_ssm.data.config import DatasetConfig
from sparse_ssm.data.sources import load_splits, split_documents
from sparse_ssm.data.streams import tokenize_splits
from sparse_ssm.data.windows import WindowDataset
from sparse_ssm.util.errors import DataError
from sparse_ssm.data.tokenizer import EOS, capped_vocab_size, train_tokenizer



def cfg(tmp_path, **kw):
    base = dict(type="custom", max_seq_len=16, stride=16, val_split=0.2, test_split=0.2, cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return DatasetConfig(**base)


def records(n):
    return [{"text": make_text(6, seed=i), "id": i} for i in range(n)]


def all_text(splits):
    return sorted(t for part in splits.values() for t in part)


def test_custom_text_folder(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(10):
        (folder / f"doc{i}.txt").write_text(make_text(8, seed=i))
    (folder / "ATTRIBUTION").write_text("not a document")
    splits = load_splits(cfg(tmp_path, data_path=str(folder)))
    assert all_text(splits) == sorted(make_text(8, seed=i) for i in range(10))
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [6, 2, 2]


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_custom_record_files(tmp_path, kind):
    recs = records(10)
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    elif kind == "json":
        path.write_text(json.dumps(recs))
    else:
        pq.write_table(pa.Table.from_pylist(recs), path)
    splits = load_splits(cfg(tmp_path, data_path=str(path)))
    assert all_text(splits) == sorted(r["text"] for r in recs)


def test_custom_missing_field_names_it(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="no field 'text'.*dataset.text_field"):
        load_splits(cfg(tmp_path, data_path=str(path)))


@pytest.mark.parametrize("wrapped", [False, True])
def test_synthetic_json(tmp_path, wrapped):
    recs = [{"prompt": "p", "text": make_text(5, seed=i)} for i in range(10)]
    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps({"version": 1, "records": recs} if wrapped else recs))
    splits = load_splits(cfg(tmp_path, type="synthetic", data_path=str(path)))
    assert all_text(splits) == sorted(r["text"] for r in recs)


def test_wikitext_schema_from_local_files(tmp_path):
    folder = tmp_path / "wikitext-103-raw-v1"
    folder.mkdir()
    lines = {s: [" = Title = ", " " + make_text(4, seed=i), ""] for i, s in enumerate(("train", "validation", "test"))}
    for split, rows in lines.items():
        pq.write_table(pa.Table.from_pylist([{"text": r} for r in rows]), folder / f"{split}-00000-of-00001.parquet")
    splits = load_splits(cfg(tmp_path, type="wikitext103", data_path=str(folder)))
    for split, rows in lines.items():
        assert " = Title = " in splits[split][0] and rows[1].strip()[:20] in splits[split][0]


def test_pile_schema_from_local_jsonl(tmp_path):
    path = tmp_path / "pile.jsonl"
    path.write_text("".join(json.dumps({"text": make_text(3, seed=i), "meta": {"pile_set_name": "x"}}) + "\n"
                            for i in range(20)))
    splits = load_splits(cfg(tmp_path, type="pile", data_path=str(path), max_documents=10))
    assert sum(len(v) for v in splits.values()) == 10


def test_hub_unreachable_gives_a_clear_error(tmp_path, monkeypatch, capsys):
    import datasets
    import huggingface_hub

    for module in (datasets.config, huggingface_hub.constants):     # offline, as without a network
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")   # nothing cached
    config = tmp_path / "c.yaml"
    config.write_text(f"dataset:\n  type: wikitext103\n  data_path: null\n  max_seq_len: 64\n  stride: 64\n"
                      f"training:\n  output_dir: {tmp_path / 'out'}\n  device: cpu\n  mixed_precision: 'no'\n")
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "could not load Salesforce/wikitext" in err and "dataset.data_path" in err


def test_missing_data_path_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="python -m sparse_ssm.data.corpus"):
        load_splits(cfg(tmp_path, data_path=str(tmp_path / "shakespeare")))


def test_split_is_deterministic_and_disjoint():
    docs = [make_text(400, seed=i) for i in range(5)]   # long documents are cut into segments
    a = split_documents(docs, 0.1, 0.2, seed=3)
    b = split_documents(docs, 0.1, 0.2, seed=3)
    c = split_documents(docs, 0.1, 0.2, seed=4)
    assert a == b and a != c
    for split in (a, c):                                 # (the segments here are distinct texts)
        train, val, test = (set(split[name]) for name in ("train", "validation", "test"))
        assert not train & val and not train & test and not val & test
        total = sum(len(v) for v in split.values())
        assert total >= 10 and len(test) == round(0.2 * total) and len(val) == round(0.1 * total)
    assert "".join(sorted(sum(a.values(), []))) == "".join(sorted(sum(c.values(), [])))
    with pytest.raises(DataError, match="too few"):
        split_documents(["one short doc"], 0.1, 0.1, seed=0)


def test_tokenizer_round_trip_and_cap():
    text = make_text(300)
    tok = train_tokenizer([text], vocab_size=400)
    assert tok.get_vocab_size() <= 400 and tok.token_to_id(EOS) is not None
    for sample in SENTENCES + ["  leading spaces\tand tabs\n", "ünïcödé ✓ 中文"]:
        assert tok.decode(tok.encode(sample).ids) == sample
    assert capped_vocab_size(50000, 5_000_000) == 12500 and capped_vocab_size(50000, 10_000) == 512
    assert capped_vocab_size(300, 10_000) == 300


def test_tokenized_splits_are_cached(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(10):
        (folder / f"doc{i}.txt").write_text(make_text(20, seed=i))
    config = cfg(tmp_path, data_path=str(folder))
    splits = load_splits(config)
    tok = train_tokenizer(splits["train"], 300)
    first = tokenize_splits(config, splits, tok)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    second = tokenize_splits(config, None, tok)          # served from the cache, source not read
    for name in first:
        assert np.array_equal(first[name], second[name])
    (folder / "doc0.txt").write_text(make_text(21, seed=99))   # a changed source invalidates it
    tokenize_splits(config, load_splits(config), tok)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_windows_and_score_once_labels():
    stream = np.arange(50, dtype=np.int32)
    train = WindowDataset(stream, length=10, stride=4)
    assert [int(s) for s in train.starts] == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    ev = WindowDataset(stream, length=10, stride=4, score_once=True)
    scored = []
    for i in range(len(ev)):
        ids, labels = ev[i]
        scored += [int(t) for t in labels[1:] if t != -100]
    assert scored == list(range(1, 50))                     # every token but the first scored once


@pytest.mark.parametrize("name, content, message", [
    ("latin1.txt", "line one\ncaf\xe9\n".encode("latin-1"), r"latin1.txt: line 2: not UTF-8 \(byte 0xe9\); save the file as UTF-8"),
    ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"image.txt: line 3: a NUL byte: a binary file"),
    ("notes.csv", b"text\nhello\n", r"notes.csv: unsupported file type '.csv'; the data must be text files"),
    ("README", b"hello\n", r"README: unsupported file type '\(no suffix\)'"),
    ("d.jsonl", b'{"text": "a"}\n\n{"text": "b",}\n', r"d.jsonl: line 3: not valid JSON \(Expecting property name"),
    ("d.jsonl", b'{"text": "a"}\n["b"]\n', r"d.jsonl: line 2: expected a JSON object .*got a list"),
    ("d.jsonl", b'{"text": "a"}\n{"text": 5}\n', r"d.jsonl: line 2: field 'text' is not text \(int 5\)"),
    ("d.json", b'[{"text": "a"},\n {"text": "b"\n]', r"d.json: line 3: not valid JSON \(Expecting ','"),
    ("d.json", b'{"text": "a"}', r"d.json: expected a list of records"),
    ("d.parquet", b"PAR1 not really", r"d.parquet: not a readable parquet file"),
])
def test_unreadable_data_names_the_file_the_line_and_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_splits(cfg(tmp_path, data_path=str(path)))


def test_folders_skip_other_files_but_say_when_nothing_is_left(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.csv").write_text("x")
    (folder / "b.pdf").write_bytes(b"%PDF")
    with pytest.raises(DataError, match=r"holds no .*files \(only .csv, .pdf\)"):
        load_splits(cfg(tmp_path, data_path=str(folder)))
    (folder / "c.txt").write_text("   \n")
    with pytest.raises(DataError, match="no non-empty documents"):
        load_splits(cfg(tmp_path, data_path=str(folder)))


def test_text_files_read_as_before_and_json_lines_in_a_json_file(tmp_path):
    (tmp_path / "crlf.txt").write_bytes("\ufeffone\r\ntwo\rthree\n".encode())
    (tmp_path / "lines.json").write_text('{"text": "first"}\n{"text": "second", "x": 1}\n{"other": 2}\n')
    from sparse_ssm.data.sources import read_documents
    docs = read_documents([tmp_path / "crlf.txt", tmp_path / "lines.json"], "text")
    assert docs == ["\ufeffone\ntwo\nthree\n", "first", "second"]     # universal newlines, like open(); BOM kept


def test_evaluate_names_a_bad_data_file_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    from sparse_ssm.train.evaluation import perplexity_on_file
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: not valid JSON"):
        perplexity_on_file(None, None, bad, 16)

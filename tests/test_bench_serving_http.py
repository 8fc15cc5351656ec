"""bench/serving_http.py (our server against llama-cpp-python's, same client): its flags, the request
it sends, how it reads a stream and counts its tokens, the server commands, the order of the servers,
and the tokenizer it writes from a GGUF's vocabulary."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import serving_http  # noqa: E402


def test_flags_default_to_both_precisions_both_archs_and_1_and_8_streams():
    args = serving_http.parse_args([])
    assert (args.weights, args.archs, args.gguf_types) == (["fp32", "int8"], ["mamba2", "mamba1"], ["f32", "q8_0"])
    assert (args.streams, args.tokens, args.server_core) == ([1, 8], 64, 0)
    dry = serving_http.parse_args(["--dry-run", "--archs", "", "--streams", "1,2"])
    assert (dry.rounds, dry.tokens, dry.archs, dry.streams) == (1, 8, [], [1, 2])
    with pytest.raises(SystemExit):
        serving_http.parse_args(["--gguf-types", "q4_0"])


def test_the_request_is_a_greedy_stream_of_exactly_max_tokens():
    body = serving_http.request_body("bench", 64)
    assert body["stream"] is True and body["max_tokens"] == 64 and body["temperature"] == 0.0
    assert body["model"] == "bench" and body["prompt"] == serving_http.PROMPT


def chunk(text, finish=None):
    return "data: " + json.dumps({"choices": [{"text": text, "index": 0, "finish_reason": finish}]})


def test_a_stream_is_read_up_to_done_and_a_failure_raises():
    lines = [": ping", chunk("a"), "", chunk("b", "length"), "data: [DONE]", chunk("after")]
    assert [e["choices"][0]["text"] for e in serving_http.sse_events(lines)] == ["a", "b"]
    with pytest.raises(RuntimeError, match="boom"):
        serving_http.sse_events([chunk("a"), 'data: {"error": {"message": "boom"}}'])


def test_tokens_are_max_tokens_when_the_stream_reached_its_length_else_the_chunks_with_text():
    # a chunk may hold no text (an incomplete UTF-8 character): "length" still means all 4 tokens
    full = serving_http.sse_events([chunk("a"), chunk(""), chunk("b"), chunk("c", "length"), "data: [DONE]"])
    assert serving_http.count_tokens(full, 4) == {"tokens": 4, "chunks": 3, "finish_reason": "length"}
    eos = serving_http.sse_events([chunk("a"), chunk("b", "stop")])
    assert serving_http.count_tokens(eos, 4) == {"tokens": 2, "chunks": 2, "finish_reason": "stop"}
    cut = serving_http.sse_events([chunk("a"), "data: [DONE]"])          # interrupted by another request
    assert serving_http.count_tokens(cut, 4) == {"tokens": 1, "chunks": 1, "finish_reason": None}


def test_each_server_is_pinned_to_one_core_with_one_thread_and_llama_does_not_interrupt():
    ours = serving_http.server_command("ours", Path("m"), "int8", 8000, 0)
    assert ours[:3] == ["taskset", "-c", "0"] and "serve" in ours
    assert ours[ours.index("--weights") + 1] == "int8" and ours[ours.index("--port") + 1] == "8000"
    llama = serving_http.server_command("llama", Path("x.gguf"), "q8_0", 8001, 0)
    assert llama[:3] == ["taskset", "-c", "0"] and llama[llama.index("-m") + 1] == "llama_cpp.server"
    assert llama[llama.index("--n_threads") + 1] == llama[llama.index("--n_threads_batch") + 1] == "1"
    assert llama[llama.index("--interrupt_requests") + 1] == "false"


def test_servers_alternate_ours_and_llama_cpp():
    args = serving_http.parse_args([])
    names = list(serving_http.servers_of(args, Path("c"), Path("m")))
    assert names == ["ours fp32", "llama.cpp mamba2 f32", "ours int8", "llama.cpp mamba1 f32",
                     "llama.cpp mamba2 q8_0", "llama.cpp mamba1 q8_0"]
    assert list(serving_http.servers_of(serving_http.parse_args(["--archs", ""]), Path("c"), Path("m"))) == [
        "ours fp32", "ours int8"]


def test_the_tokenizer_written_from_a_gguf_encodes_with_its_merges(tmp_path):
    gguf = pytest.importorskip("gguf")
    from tokenizers import Tokenizer

    tokens = ["<|endoftext|>", "h", "e", "l", "o", "Ġ", "he", "ll", "hell", "hello", "Ġhello"]
    writer = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "mamba2")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["h e", "l l", "he ll", "hell o", "Ġ hello"])
    writer.add_token_types([3] + [1] * (len(tokens) - 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tokenizer = Tokenizer.from_file(str(serving_http.gguf_tokenizer(tmp_path / "v.gguf", tmp_path / "t.json")))
    assert tokenizer.encode("hello hello<|endoftext|>").ids == [9, 10, 0]
    assert tokenizer.decode([9, 10]) == "hello hello"

"""POST /tokenize, POST /detokenize, GET /tokenizer_info (vLLM's shapes, which evaluation harnesses detect) and
GET /version: the served tokenizer's own answers."""

import httpx
import pytest

import hayabusa
from hayabusa.tokenizer import Tokenizer

from server_harness import MODEL, assert_openai_error, running_server

TEXTS = ["吾輩は猫である。名前はまだ無い。", "URL https://example.com と 😊 と\n改行と　全角空白",
         "Ａｌｐｈａ 123,456円"]


@pytest.fixture(scope="module")
def server():
    with running_server(kv_cache_blocks=16) as running:
        yield running


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(MODEL)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_gives_the_tokenizers_ids_in_vllms_shape(server, tokenizer, text) -> None:
    ids = tokenizer.encode(text)
    plain = httpx.post(f"{server.url}/tokenize", json={"prompt": text}).json()
    assert plain == {"count": len(ids), "max_model_len": 512, "tokens": ids, "token_strs": None}
    named = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True,
                                                       "add_special_tokens": False}).json()
    assert named["tokens"] == ids and named["token_strs"] == tokenizer.convert_ids_to_tokens(ids)
    back = httpx.post(f"{server.url}/detokenize", json={"model": MODEL, "tokens": ids}).json()
    assert back == {"prompt": tokenizer.decode(ids)}


def test_detokenize_joins_byte_tokens_and_takes_no_tokens(server, tokenizer) -> None:
    ids = tokenizer.encode("𩸽")  # a character the vocabulary lacks: byte tokens, decoded together
    assert len(ids) > 1
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json() == {"prompt": "𩸽"}
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(("route", "body", "status", "param", "words"), [
    ("/tokenize", {"prompt": 5}, 400, "prompt", ["valid string"]),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "messages", ["unknown field"]),
    ("/tokenize", {"model": "gpt-4", "prompt": "x"}, 404, "model", ["'gpt-4' does not exist"]),
    ("/detokenize", {"tokens": [1, 32000]}, 400, "tokens.1", ["32000 is not a token id", "[0, 32000)"]),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens.0", ["-1 is not a token id"]),
    ("/detokenize", {"tokens": ["1"]}, 400, "tokens.0", ["valid integer"]),
    ("/detokenize", {"model": "other", "tokens": [1]}, 404, "model", ["does not exist"]),
])
def test_bad_tokenization_requests(server, route, body, status, param, words) -> None:
    assert_openai_error(httpx.post(f"{server.url}{route}", json=body), status, *words, param=param)


def test_tokenizer_info_and_version(server, tokenizer) -> None:
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info == {"tokenizer_class": "GPTNeoXJapaneseTokenizer", "bos_token": "<|startoftext|>",
                    "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                    "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                    "unk_token_id": tokenizer.unk_token_id, "pad_token_id": tokenizer.pad_token_id,
                    "vocab_size": tokenizer.vocab_size, "model_max_length": 512, "do_clean_text": False}
    assert httpx.get(f"{server.url}/version").json() == {"version": hayabusa.__version__}

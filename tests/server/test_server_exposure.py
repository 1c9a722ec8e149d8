"""What a server put on a network needs: an API key on every route but the open ones (401 in OpenAI's shape), a
request id echoed and logged, CORS only for the origins given, and `serve`'s flags and environment for them."""

import argparse
import logging

import httpx
import openai
import pytest

from hayabusa.engine.server.cli import api_key_from, settings_from_args
from hayabusa.engine.server.middleware import OPEN_PATHS, ApiKeyMiddleware

from server_harness import MODEL, assert_openai_error, parse, running_server

KEY = "sk-hayabusa-test-0123456789"
ORIGIN = "https://notebook.example.jp"
BODY = {"model": MODEL, "prompt": "吾輩は猫である。", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    with running_server(kv_cache_blocks=32, api_key=KEY, allowed_origins=(ORIGIN,)) as running:
        yield running


@pytest.fixture(scope="module")
def open_server():
    with running_server(kv_cache_blocks=32) as running:
        yield running


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers", [{}, bearer("sk-wrong"), bearer(KEY + "x"), bearer(KEY[:-1]),
                                     {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}])
@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/completions"), ("GET", "/v1/models"),
                                              ("POST", "/v1/chat/completions"), ("GET", "/v1/no-such-route"),
                                              ("POST", "/tokenize"), ("POST", "/detokenize"),
                                              ("GET", "/tokenizer_info")])
def test_every_route_but_the_open_ones_needs_the_key(server, headers, method, path) -> None:
    response = httpx.request(method, f"{server.url}{path}", json=BODY, headers=headers)
    assert_openai_error(response, 401, "Bearer")
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"
    assert KEY not in response.text and "sk-wrong" not in response.text  # never echoes a key


def test_the_right_key_passes_and_the_open_routes_need_none(server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(**BODY).choices[0].finish_reason == "length"
    assert [card.id for card in client.models.list().data] == [MODEL]
    lower_scheme = {"Authorization": f"bearer {KEY}"}
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "猫"}, headers=lower_scheme).status_code == 200
    assert OPEN_PATHS == {"/health", "/metrics", "/version", "/openapi.json"}
    for path in OPEN_PATHS:
        assert httpx.get(f"{server.url}{path}").status_code == 200, path
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_the_document_declares_the_key(server, open_server) -> None:
    document = httpx.get(f"{server.url}/openapi.json").json()
    assert document["components"]["securitySchemes"] == {"apiKey": {"type": "http", "scheme": "bearer"}}
    completions = document["paths"]["/v1/completions"]["post"]
    assert completions["security"] == [{"apiKey": []}] and "401" in completions["responses"]
    assert "security" not in document["paths"]["/health"]["get"]
    unguarded = httpx.get(f"{open_server.url}/openapi.json").json()
    assert "securitySchemes" not in unguarded["components"]
    assert "401" not in unguarded["paths"]["/v1/completions"]["post"]["responses"]


def test_keys_are_compared_as_digests_of_any_length() -> None:
    guard = ApiKeyMiddleware(app=None, api_key="ключ-鍵", refuse=None)  # non-ASCII keys: the client sends UTF-8
    assert guard._problem(f"Bearer {'ключ-鍵'.encode().decode('latin-1')}") is None
    for wrong in ("Bearer ", "Bearer k", "Bearer " + "x" * 10_000):
        assert "is not this server's" in guard._problem(wrong)
    with pytest.raises(ValueError, match="empty"):
        ApiKeyMiddleware(app=None, api_key="", refuse=None)


def test_the_key_comes_from_the_flag_or_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("HAYABUSA_API_KEY", raising=False)
    assert settings_from_args(parse(["serve", "--model", "tiny"])).api_key is None
    monkeypatch.setenv("HAYABUSA_API_KEY", "from-env")
    assert settings_from_args(parse(["serve", "--model", "tiny"])).api_key == "from-env"
    assert settings_from_args(parse(["serve", "--model", "tiny", "--api-key", "flag"])).api_key == "flag"
    monkeypatch.setenv("HAYABUSA_API_KEY", "")  # a deployment that meant a key and got none must not serve everyone
    with pytest.raises(ValueError, match="HAYABUSA_API_KEY is set but empty"):
        api_key_from(argparse.Namespace(api_key=None))
    with pytest.raises(ValueError, match="--api-key is empty"):
        api_key_from(argparse.Namespace(api_key=""))


# ---- request ids ------------------------------------------------------------------------------------------------

def test_a_request_id_is_echoed_or_made_and_logged(open_server, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="hayabusa.server.access"):
        mine = httpx.post(f"{open_server.url}/v1/completions", json=BODY, headers={"X-Request-Id": "job-42/7"})
        made = httpx.post(f"{open_server.url}/v1/completions", json={**BODY, "n": 0})
        bad = httpx.get(f"{open_server.url}/health", headers={"X-Request-Id": "has spaces " + "x" * 200})
    assert mine.status_code == 200 and mine.headers["x-request-id"] == "job-42/7"
    assert made.status_code == 400 and len(made.headers["x-request-id"]) == 32  # errors carry one too
    assert bad.headers["x-request-id"] != bad.request.headers["x-request-id"]  # not echoed: replaced
    lines = [record.getMessage() for record in caplog.records if record.name == "hayabusa.server.access"]
    assert any('"POST /v1/completions" 200' in line and line.endswith("request_id=job-42/7") for line in lines)
    assert any('"POST /v1/completions" 400' in line and made.headers["x-request-id"] in line for line in lines)


# ---- CORS -------------------------------------------------------------------------------------------------------

def test_cors_answers_only_the_allowed_origins(server, open_server) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(f"{server.url}/v1/completions", headers=preflight)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    call = httpx.post(f"{server.url}/v1/completions", json=BODY, headers={**bearer(), "Origin": ORIGIN})
    assert call.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in call.headers["access-control-expose-headers"].lower()
    refused = httpx.post(f"{server.url}/v1/completions", json=BODY, headers={"Origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN  # readable
    other = httpx.options(f"{server.url}/v1/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    # without --allowed-origins: no CORS at all
    plain = httpx.post(f"{open_server.url}/v1/completions", json=BODY, headers={"Origin": ORIGIN})
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
    assert_openai_error(httpx.options(f"{open_server.url}/v1/completions", headers=preflight), 405)

"""The server held to its own /openapi.json by schemathesis: for every route, requests drawn from the document
(positive: what it allows; negative: what it forbids, for routes with a body) must never get a 500 or hang, must get
only documented statuses, content types, headers and bodies, must be refused (4xx) whenever the document forbids
them, must be refused without the API key, and every error must be OpenAI's error shape; /health answers ok
afterwards and the engine holds no request and no KV block.

Not checked: that every request the document allows is accepted. Some limits depend on the rest of the request or on
the server's state (prompt + max_tokens within the context, best_of >= n, the queue), so a 400 for a schema-valid
body is right there.

CI draws a few cases per route, always the same ones (derandomized); `-m fuzz_exhaustive` draws many, randomly.
"""

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server_harness import running_server

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
REQUEST_TIMEOUT_S = 30  # "no hang": a request still unanswered by then fails the test
OPERATIONS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
              ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/tokenizer_info"), ("GET", "/version"),
              ("GET", "/health"), ("GET", "/metrics"), ("GET", "/openapi.json")]
WITH_BODY = [(method, path) for method, path in OPERATIONS if method == "POST"]
CI_EXAMPLES = 20
EXHAUSTIVE_EXAMPLES = 400


def openai_error_shape(ctx, response, case) -> None:
    """Every error status carries {"error": {"message", "type", "param", "code"}} and no traceback (/health's 503
    is its own {"status"})."""
    if response.status_code < 400 or case.operation.path == "/health":
        return
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, response.text
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], response.text
    assert "Traceback" not in response.text


def stream_events_parse(ctx, response, case) -> None:
    """A stream is `data: <completion chunk or error>` events ending with `data: [DONE]`."""
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return
    events = [line for line in response.text.split("\n") if line]
    assert events and all(line.startswith("data: ") for line in events), response.text
    assert events[-1] == "data: [DONE]", response.text
    for event in events[:-1]:
        chunk = json.loads(event.removeprefix("data: "))
        assert set(chunk) == {"error"} or chunk["object"] == "text_completion", event


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, ignored_auth]


@pytest.fixture(scope="module")
def server():
    # Small limits keep each drawn completion cheap on a CPU; the document states them.
    with running_server(kv_cache_blocks=32, max_model_len=128, max_tokens_per_request=48, api_key=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def fuzz(server, schema, method: str, path: str, mode: GenerationMode, max_examples: int, derandomize: bool) -> None:
    operation = schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    def run(case) -> None:
        response = case.call(base_url=server.url, headers=AUTH, timeout=REQUEST_TIMEOUT_S)
        case.validate_response(response, checks=CHECKS, additional_checks=[openai_error_shape, stream_events_parse],
                               headers=AUTH)

    run()
    server.wait_until_idle()
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert server.app.state.drain.num_in_flight == 0


def test_the_document_covers_every_route(server) -> None:
    documented = {(method.upper(), path) for path, item in httpx.get(f"{server.url}/openapi.json").json()[
        "paths"].items() for method in item}
    served = {(method, route.path) for route in server.app.routes for method in route.methods if method != "HEAD"}
    assert documented == served == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_allowed_requests(server, schema, method, path) -> None:
    fuzz(server, schema, method, path, GenerationMode.POSITIVE, CI_EXAMPLES, derandomize=True)


@pytest.mark.parametrize(("method", "path"), WITH_BODY)
def test_forbidden_requests(server, schema, method, path) -> None:
    fuzz(server, schema, method, path, GenerationMode.NEGATIVE, CI_EXAMPLES, derandomize=True)


@pytest.mark.fuzz_exhaustive
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_many_drawn_requests(server, schema, method, path, mode) -> None:
    if mode is GenerationMode.NEGATIVE and (method, path) not in WITH_BODY:
        pytest.skip("nothing to negate: no body (a header is any string)")
    fuzz(server, schema, method, path, mode, EXHAUSTIVE_EXAMPLES, derandomize=False)

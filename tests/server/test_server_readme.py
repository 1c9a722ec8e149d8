"""The README's Serve section works as written: its curl bodies and openai-client example against a live server,
its batch recipe on one engine."""

import json
import re
import shlex
from pathlib import Path

import httpx

from hayabusa.engine.cli import main

from server_harness import MODEL, parse, running_server

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
SERVE = README[README.index("## Serve"): README.index("## CLI")]
README_URL = "http://127.0.0.1:8000"


def test_curl_bodies_and_the_client_example_run_against_a_server(capsys) -> None:
    urls = re.findall(r"^curl -sN? (\S+)", SERVE, re.M)
    bodies = [json.loads(body) for body in re.findall(r"^  -d '(.*)'$", SERVE, re.M)]
    assert len(urls) == len(bodies) == 3  # two completions, one /tokenize
    client_blocks = re.findall(r"```py\n(.*?)```", SERVE, re.S)
    assert len(client_blocks) == 1 and README_URL in client_blocks[0]
    with running_server(kv_cache_blocks=64) as server:
        for url, body in zip(urls, bodies, strict=True):
            assert body.get("model", MODEL) == MODEL
            response = httpx.post(url.replace(README_URL, server.url), json=body, timeout=30)
            assert response.status_code == 200, response.text
            if body.get("stream"):
                assert response.text.rstrip().endswith("data: [DONE]")
        exec(compile(client_blocks[0].replace(README_URL, server.url), "README.md serve example", "exec"), {})
    assert "length" in capsys.readouterr().out


def test_the_batch_recipe(tmp_path, monkeypatch) -> None:
    (echo,) = re.findall(r"^echo '(.*)' > prompts.jsonl$", SERVE, re.M)
    (tmp_path / "prompts.jsonl").write_text(echo + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    (command,) = re.findall(r"^hayabusa (batch --model tiny .*)$", SERVE, re.M)
    assert main(shlex.split(command)) == 0
    (line,) = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    result = json.loads(line)
    assert result["completion_tokens"] == json.loads(echo)["max_new_tokens"]
    assert set(result) == {"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"}


def test_the_serve_command_lines_parse() -> None:
    lines = re.findall(r"^hayabusa (serve .*?)(?:\s+#.*)?$", SERVE, re.M)
    commands = [parse(shlex.split(line)) for line in lines]
    assert len(commands) == 4 and all(args.command == "serve" and args.model for args in commands)
    assert [(args.host, args.max_model_len, args.grace) for args in commands if args.host != "127.0.0.1"] == [
        ("0.0.0.0", 1024, 25.0)]

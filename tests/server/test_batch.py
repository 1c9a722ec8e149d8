"""`hayabusa batch` on one engine: one result line per input line, in order, equal to `Engine.generate`; a bad
line or output path stops the run before any model loads, naming the file, the line and the field; a failed run
leaves no file behind."""

import json
import os

import pytest

from hayabusa.engine import Engine
from hayabusa.engine.cli import main
from hayabusa.engine.server import batch


def run_batch(tmp_path, lines: list[str], *extra: str) -> int:
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return main(["batch", "--model", "tiny", "--backend", "reference", "--device", "cpu", "--input",
                 str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), *extra])


def test_results_follow_the_input_order_and_equal_generate(tmp_path) -> None:
    records = [{"prompt": "吾輩は猫である。", "max_new_tokens": 5},
               {"prompt": [30014, 26883], "max_new_tokens": 3, "do_sample": True, "temperature": 0.7, "seed": 5},
               {"prompt": "東京", "max_new_tokens": 4, "stop": ["の"], "repetition_penalty": 1.2}]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    assert run_batch(tmp_path, [lines[0], "", *lines[1:]], "--batch-size", "2") == 0  # blank lines are skipped
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    engine = Engine.from_pretrained("tiny", backend="reference", device="cpu")
    for result, record in zip(got, records, strict=True):
        fields = {k: v for k, v in record.items() if k != "prompt"}
        (want,) = engine.generate(record["prompt"], **fields)
        assert result == {"text": want.text, "token_ids": want.token_ids, "finish_reason": want.finish_reason,
                          "prompt_tokens": len(want.prompt_token_ids), "completion_tokens": len(want.token_ids)}
    assert not (tmp_path / "out.jsonl.partial").exists()


@pytest.fixture
def nothing_loads(monkeypatch):
    def loaded(spec):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(batch.EngineSpec, "load", loaded)


@pytest.mark.parametrize(("bad_line", "words"), [
    ('{"prompt": "a", "max_tokens": 5}', ["in.jsonl:3: unknown field 'max_tokens'", "max_new_tokens"]),
    ('{"prompt": "a", "temperature": "hot"}', ["in.jsonl:3: 'temperature' must be a number, got \"hot\""]),
    ('{"prompt": "a", "temperature": true}', ["in.jsonl:3: 'temperature' must be a number, got true"]),
    ('{"prompt": "a", "ignore_eos": "false"}', ["in.jsonl:3: 'ignore_eos' must be true or false, got \"false\""]),
    ('{"prompt": "a", "seed": "7"}', ["in.jsonl:3: 'seed' must be an integer or null, got \"7\""]),
    ('{"prompt": "a", "stop": ["x", 5]}', ["in.jsonl:3: 'stop' must be a list of strings, got [\"x\", 5]"]),
    ('{"prompt": "a", "max_new_tokens": null}', ["in.jsonl:3: 'max_new_tokens' must be an integer, got null"]),
    ('{"prompt": 5}', ['in.jsonl:3: "prompt" must be a string or a list of token ids']),
    ('{"prompt": [1, -2]}', ['in.jsonl:3: "prompt" must be a string or a list of token ids (integers >= 0)']),
    ('{"prompt": ""}', ['in.jsonl:3: "prompt" is empty']),
    ('{"prompt": []}', ['in.jsonl:3: "prompt" is empty']),
    ('{"max_new_tokens": 5}', ['in.jsonl:3: each line must be a JSON object with a "prompt"']),
    ('{"prompt": "a", "top_p": 0}', ["in.jsonl:3: top_p must be in (0, 1]"]),
    ('{"prompt": "a", "num_return_sequences": 2}', ["in.jsonl:3: 'num_return_sequences' is not supported by hayabusa "
                                                    "batch (one text per line)"]),
    ('{"prompt": "a"', ["in.jsonl:3: not valid JSON"]),
    ('{"prompt": "a", "guided_regex": "a(b"}', ["in.jsonl:3: structured_outputs.regex is invalid", "unclosed group"]),
    ('{"prompt": "a", "guided_regex": "a", "structured_outputs": {"choice": ["b"]}}',
     ["in.jsonl:3: guided_regex and structured_outputs each constrain the output"]),
])
def test_a_bad_line_is_named_before_any_work(tmp_path, capsys, nothing_loads, bad_line, words) -> None:
    """Before: an empty prompt failed after the model loaded (leaving an empty .partial), and a wrong type was "a
    sampling field has the wrong type ('>=' not supported ...)", naming no field; "false" passed for true."""
    assert run_batch(tmp_path, ['{"prompt": "ok"}', "", bad_line]) == 1
    err = capsys.readouterr().err
    for word in words:
        assert word in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_input_that_is_not_utf8_is_named_with_its_line(tmp_path, capsys, nothing_loads) -> None:
    """Before: "'utf-8' codec can't decode byte 0xff in position 0", naming no file."""
    (tmp_path / "in.jsonl").write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    assert main(["batch", "--model", "tiny", "--input", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / "out.jsonl")]) == 1
    assert capsys.readouterr().err == (f"hayabusa batch: error: {tmp_path / 'in.jsonl'}:2: not valid UTF-8 (byte "
                                       f"0xe9); jsonl is UTF-8 text\n")


@pytest.mark.parametrize(("output", "message"), [
    ("out", "--output {out} is a directory; give the file to write, e.g. {out}/out.jsonl"),
    ("missing/out.jsonl", "--output {out}: there is no directory {tmp}/missing"),
    ("in.jsonl", "--output {out} is the --input file; write the results elsewhere"),
])
def test_a_bad_output_path_is_refused_before_any_work(tmp_path, capsys, nothing_loads, output, message) -> None:
    """Before: --output DIR generated everything, then failed with "[Errno 21] Is a directory" and left DIR.partial."""
    (tmp_path / "out").mkdir()
    (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n', encoding="utf-8")
    out = tmp_path / output
    assert main(["batch", "--model", "tiny", "--input", str(tmp_path / "in.jsonl"), "--output", str(out)]) == 1
    assert capsys.readouterr().err == f"hayabusa batch: error: {message.format(out=out, tmp=tmp_path)}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out"] and not any((tmp_path / "out").iterdir())


@pytest.mark.skipif(not os.path.isdir("/sys"), reason="needs Linux's read-only /sys (unwritable even for root)")
def test_an_unwritable_output_is_refused_before_any_work(tmp_path, capsys, nothing_loads) -> None:
    (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n', encoding="utf-8")
    assert main(["batch", "--model", "tiny", "--input", str(tmp_path / "in.jsonl"), "--output", "/sys/out.jsonl"]) == 1
    assert capsys.readouterr().err.startswith("hayabusa batch: error: --output /sys/out.jsonl: cannot write "
                                              "/sys/out.jsonl.partial (")


def test_a_failure_after_loading_leaves_no_file(tmp_path, capsys) -> None:
    long_prompt = json.dumps({"prompt": list(range(1, 600)), "max_new_tokens": 1})
    assert run_batch(tmp_path, ['{"prompt": "a", "max_new_tokens": 1}', long_prompt]) == 1
    assert "context length 512" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_an_interrupted_run_leaves_no_file(tmp_path, monkeypatch) -> None:
    def interrupted(spec, lines, batch_size, where):
        yield {"text": "first"}
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "run_local", interrupted)
    assert run_batch(tmp_path, ['{"prompt": "a"}', '{"prompt": "b"}']) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_lines_end_at_newlines_only(tmp_path) -> None:
    """A prompt may hold U+2028 or U+0085 raw, where str.splitlines would cut the line (and its JSON) in two."""
    records = [{"prompt": "東京\u2028大阪\x85", "max_new_tokens": 1}, {"prompt": "猫", "max_new_tokens": 1}]
    assert run_batch(tmp_path, [json.dumps(r, ensure_ascii=False) for r in records]) == 0
    got = (tmp_path / "out.jsonl").read_text(encoding="utf-8").split("\n")
    assert len(got) == 3 and got[2] == "" and json.loads(got[0])["prompt_tokens"] > 1


def test_lines_may_carry_an_output_constraint(tmp_path) -> None:
    records = [{"prompt": "東京", "max_new_tokens": 20, "structured_outputs": {"regex": "[0-9]{3}"}},
               {"prompt": "東京", "max_new_tokens": 20, "guided_choice": ["はい", "いいえ"]},
               {"prompt": "東京", "max_new_tokens": 40, "response_format": {"type": "json_schema", "json_schema": {
                   "name": "n", "schema": {"type": "object", "properties": {"n": {"enum": [1, 2]}},
                                           "required": ["n"], "additionalProperties": False}}}}]
    assert run_batch(tmp_path, [json.dumps(r, ensure_ascii=False) for r in records]) == 0
    regex, choice, schema = (json.loads(line)["text"]
                             for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines())
    assert len(regex) == 3 and regex.isdigit() and choice in ("はい", "いいえ") and json.loads(schema)["n"] in (1, 2)

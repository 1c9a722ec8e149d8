"""`hayabusa batch` on one engine: one result line per input line, in order, equal to `Engine.generate`; a bad
line stops the run before any model loads, naming the file, the line and the field."""

import json

import pytest

from hayabusa.engine import Engine
from hayabusa.engine.cli import main


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


@pytest.mark.parametrize(("bad_line", "words"), [
    ('{"prompt": "a", "max_tokens": 5}', ["in.jsonl:3: unknown field 'max_tokens'", "max_new_tokens"]),
    ('{"prompt": "a", "temperature": "hot"}', ["in.jsonl:3: a sampling field has the wrong type"]),
    ('{"prompt": 5}', ['in.jsonl:3: "prompt" must be a string or a list of token ids']),
    ('{"max_new_tokens": 5}', ['in.jsonl:3: each line must be a JSON object with a "prompt"']),
    ('{"prompt": "a", "top_p": 0}', ["in.jsonl:3: top_p must be in (0, 1]"]),
    ('{"prompt": "a", "num_return_sequences": 2}', ["in.jsonl:3: 'num_return_sequences' is not supported by hayabusa "
                                                    "batch (one text per line)"]),
    ('{"prompt": "a"', ["in.jsonl:3: not valid JSON"]),
])
def test_a_bad_line_is_named_before_any_work(tmp_path, capsys, bad_line, words) -> None:
    assert run_batch(tmp_path, ['{"prompt": "ok"}', "", bad_line]) == 1
    err = capsys.readouterr().err
    for word in words:
        assert word in err
    assert not (tmp_path / "out.jsonl").exists()

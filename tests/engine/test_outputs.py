"""OutputBuilder: text deltas, stop strings held back until resolved, eos and length limits."""

from hayabusa.engine.outputs import OutputBuilder
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.tokenizer import Tokenizer

TOKENIZER = Tokenizer.from_pretrained()
EOS = TOKENIZER.eos_token_id


def feed(text: str, **params) -> tuple[list[str], OutputBuilder]:
    builder = OutputBuilder(TOKENIZER, [1, 2], SamplingParams(**params), EOS)
    deltas = []
    for token in TOKENIZER.encode(text):
        deltas.append(builder.append(token))
        if builder.finished:
            break
    return deltas, builder


def test_stop_string_cuts_the_text_and_is_never_streamed() -> None:
    deltas, builder = feed("今日は良い天気ですね。明日も晴れるでしょう。", stop=("明日",), max_new_tokens=100)
    out = builder.result()
    assert out.finish_reason == "stop"
    assert out.text == "今日は良い天気ですね。"
    assert "".join(deltas) == out.text


def test_text_that_only_looks_like_a_stop_string_is_released() -> None:
    deltas, builder = feed("明後日と明日", stop=("明日です",), max_new_tokens=100)
    assert not builder.finished
    assert "".join(deltas) == "明後日と"  # "明日" could still become "明日です": held back
    assert builder.append(TOKENIZER.encode("は")[0]) == "明日は"


def test_length_limit_flushes_everything() -> None:
    text = "吾輩は猫である。名前はまだ無い。"
    ids = TOKENIZER.encode(text)
    deltas, builder = feed(text, max_new_tokens=len(ids), stop=("無い!",))
    out = builder.result()
    assert out.finish_reason == "length" and out.text == text and "".join(deltas) == text
    assert out.token_ids == ids and out.timings.generated_tokens == len(ids)


def test_eos_finishes_with_stop_and_keeps_the_id() -> None:
    builder = OutputBuilder(TOKENIZER, [1], SamplingParams(max_new_tokens=10), EOS)
    builder.append(TOKENIZER.encode("猫")[0])
    builder.append(EOS)
    out = builder.result()
    assert out.finish_reason == "stop" and out.token_ids[-1] == EOS and out.text == "猫"

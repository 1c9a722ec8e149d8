"""The device logits processors against transformers' own, row by row: which tokens each one forbids.

Histories are random (with repeats, so n-grams and bad words do match), every row has its own setting, and rows
that switch a processor off must come out untouched.
"""

import random

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    TopKLogitsWarper,
    TypicalLogitsWarper,
)

from hayabusa.engine.sample.logits_processors import (
    MAX_NO_REPEAT_NGRAM_SIZE,
    bad_word_patterns,
    ban_bad_word_completions,
    ban_repeated_ngrams,
    banned_tokens,
    mask_min_p,
    mask_typical,
    padded_history,
    split_bad_words,
)
from hayabusa.engine.sampling_params import SamplingParams

VOCAB = 12  # few tokens: random histories repeat n-grams often

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_histories(rng: random.Random, rows: int) -> list[list[int]]:
    return [[rng.randrange(VOCAB) for _ in range(rng.randrange(0, 30))] for _ in range(rows)]


def lengths_of(histories: list[list[int]]) -> torch.Tensor:
    return torch.tensor([len(h) for h in histories])


def transformers_bans(processor, history: list[int], vocab: int = VOCAB) -> torch.Tensor:
    scores = torch.zeros(1, vocab)
    return processor(torch.tensor([history], dtype=torch.long).view(1, -1), scores)[0].isinf()


def test_no_repeat_ngram_bans_equal_transformers() -> None:
    rng = random.Random(0)
    histories = random_histories(rng, 64) + [[1, 2, 1, 2, 1], [3], []]
    sizes = [rng.choice([0, 1, 2, 2, 3, 4, MAX_NO_REPEAT_NGRAM_SIZE]) for _ in histories[:-3]] + [2, 1, 3]
    history = padded_history(histories, 40, torch.device("cpu"))
    actual = ban_repeated_ngrams(history, lengths_of(histories), torch.tensor(sizes), VOCAB)
    for row, (tokens, size) in enumerate(zip(histories, sizes, strict=True)):
        expected = transformers_bans(NoRepeatNGramLogitsProcessor(size), tokens) if size \
            else torch.zeros(VOCAB, dtype=torch.bool)
        assert torch.equal(actual[row], expected), (row, tokens, size)
    assert actual[-3].nonzero().flatten().tolist() == [2]  # ... 1, 2, 1 | 2 would repeat (1, 2)
    assert actual.any(dim=1).sum() > 20  # the random rows do ban


def test_bad_words_bans_equal_transformers() -> None:
    rng = random.Random(1)
    eos = [VOCAB - 1, VOCAB - 2]
    histories = random_histories(rng, 48)
    words_per_row = []
    for tokens in histories:
        words = [[rng.randrange(VOCAB)] for _ in range(rng.randrange(0, 3))] + [[eos[0]]]
        for _ in range(rng.randrange(0, 4)):  # some end with the history's tail, so they are about to be completed
            size = rng.randrange(2, 6)
            tail = tokens[len(tokens) - size + 1:] if rng.random() < 0.6 and len(tokens) >= size - 1 else \
                [rng.randrange(VOCAB) for _ in range(size - 1)]
            words.append(tail + [rng.randrange(VOCAB)])
        words_per_row.append(words)
    split = [split_bad_words(words, eos) for words in words_per_row]
    history = padded_history(histories, 40, torch.device("cpu"))
    patterns = torch.tensor([bad_word_patterns(multi) for _, multi in split])
    multi_bans = ban_bad_word_completions(history, lengths_of(histories), patterns, VOCAB)
    for row, (tokens, words) in enumerate(zip(histories, words_per_row, strict=True)):
        single, _ = split[row]
        actual = multi_bans[row].clone()
        actual[single] = True
        assert torch.equal(actual, transformers_bans(NoBadWordsLogitsProcessor(words, eos), tokens)), (row, words)
        assert eos[0] not in single  # an eos id is never banned on its own
    assert multi_bans.any(dim=1).sum() > 10


def test_min_new_tokens_and_the_union_of_bans() -> None:
    rng = random.Random(2)
    histories = random_histories(rng, 16)
    params = [SamplingParams(min_new_tokens=rng.randrange(0, 6), no_repeat_ngram_size=rng.randrange(0, 4),
                             bad_words_ids=[[3], [4, 5]], eos_token_id=[VOCAB - 1, 0]) for _ in histories]
    prompt_lengths = [rng.randrange(0, len(h) + 1) for h in histories]
    single, multi = split_bad_words(params[0].bad_words_ids, params[0].eos_token_id)
    rows = len(histories)
    eos_mask = torch.zeros(rows, VOCAB, dtype=torch.bool)
    eos_mask[:, [VOCAB - 1, 0]] = True
    static_bans = torch.zeros(rows, VOCAB, dtype=torch.bool)
    static_bans[:, single] = True
    actual = banned_tokens(
        history=padded_history(histories, 40, torch.device("cpu")), lengths=lengths_of(histories),
        ngram_sizes=torch.tensor([p.no_repeat_ngram_size for p in params]),
        patterns=torch.tensor([bad_word_patterns(multi)] * rows), num_patterns=torch.full((rows,), len(multi)),
        static_bans=static_bans, has_static_bans=torch.ones(rows, dtype=torch.bool), eos_mask=eos_mask,
        completion_lengths=torch.tensor([len(h) - n for h, n in zip(histories, prompt_lengths, strict=True)]),
        min_new_tokens=torch.tensor([p.min_new_tokens for p in params]))
    for row, (tokens, p, prompt_length) in enumerate(zip(histories, params, prompt_lengths, strict=True)):
        processors = [NoBadWordsLogitsProcessor([list(w) for w in p.bad_words_ids], list(p.eos_token_id)),
                      MinNewTokensLengthLogitsProcessor(prompt_length, p.min_new_tokens, list(p.eos_token_id))]
        if p.no_repeat_ngram_size:
            processors.append(NoRepeatNGramLogitsProcessor(p.no_repeat_ngram_size))
        expected = torch.zeros(VOCAB, dtype=torch.bool)
        for processor in processors:
            expected |= transformers_bans(processor, tokens)
        assert torch.equal(actual[row], expected), row


@pytest.mark.parametrize("top_k", [0, 20])
def test_min_p_and_typical_masks_equal_transformers(top_k: int) -> None:
    torch.manual_seed(top_k)
    logits = torch.randn(6, 64) * torch.tensor([0.3, 1.0, 3.0, 6.0, 1.0, 2.0])[:, None]
    if top_k:  # the warpers after top-k see -inf entries
        logits = TopKLogitsWarper(top_k)(None, logits)
    min_p = torch.tensor([0.0, 0.05, 0.1, 0.3, 1.0, 0.5])
    typical_p = torch.tensor([1.0, 0.2, 0.5, 0.9, 0.95, 0.999])
    actual_min_p = mask_min_p(logits, min_p)
    actual_typical = mask_typical(logits, typical_p)
    for row in range(6):
        expected = MinPLogitsWarper(min_p[row].item())(None, logits[row:row + 1])
        assert torch.equal(actual_min_p[row].isinf(), expected[0].isinf()), row
        expected = TypicalLogitsWarper(typical_p[row].item())(None, logits[row:row + 1]) if typical_p[row] < 1 \
            else logits[row:row + 1]
        assert torch.equal(actual_typical[row].isinf(), expected[0].isinf()), row
        assert torch.equal(actual_typical[row][~expected[0].isinf()], logits[row][~expected[0].isinf()])
    assert not actual_min_p[0].isinf().any() or top_k  # off rows are untouched
    assert actual_typical.isinf().sum() > logits.isinf().sum()  # the masks do remove tokens

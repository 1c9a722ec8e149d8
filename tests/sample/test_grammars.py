"""The grammar engine's view of the vocabulary (engine.sample.grammar_vocab), compiled grammars, masks and their
application (engine.sample.grammars, engine.sample.ops), without a model: random walks through a grammar, each step
a uniformly drawn allowed token (class, emoji and byte tokens included), always decode to a whole match."""

import random
import re

import numpy as np
import pytest
import torch

from hayabusa.engine.sample.grammar_vocab import SPECIAL_PREFIX, token_bytes
from hayabusa.engine.sample.grammars import GrammarCompiler, grammar_masks, mask_words
from hayabusa.engine.sample.ops import allowed_tokens, sample_rows
from hayabusa.engine.structured_outputs import StructuredOutputs
from hayabusa.tokenizer import Tokenizer

TOKENIZER = Tokenizer.from_pretrained()
VOCAB = TOKENIZER.vocab_size
EOS = (TOKENIZER.eos_token_id,)
ID = TOKENIZER.convert_tokens_to_ids


@pytest.fixture(scope="module")
def compiler():
    return GrammarCompiler(TOKENIZER, VOCAB)


def allowed(matcher) -> set[int]:
    masks = grammar_masks([(matcher, 0)], 1)
    return set(np.flatnonzero(np.unpackbits(masks.view(np.uint8), bitorder="little")[:VOCAB]).tolist())


def test_each_token_is_the_bytes_decode_writes_for_it() -> None:
    tokens, specials = token_bytes(TOKENIZER, EOS, VOCAB + 3)
    assert len(tokens) == VOCAB + 3 and {VOCAB, VOCAB + 1, VOCAB + 2} <= set(specials)  # padded ids: never text
    assert tokens[ID("<|byte227|>")] == b"\xe3" and tokens[ID("<SP>")] == b" " and tokens[ID("<BR>")] == b"\n"
    assert tokens[ID("<KIGOU>")] == "ǀ".encode() and tokens[ID("<|emoji1|>")] == "😀".encode()
    for piece in ("<|startoftext|>", "<|endoftext|>", "<|separator|>", "<|nottoken|>"):
        assert ID(piece) in specials and tokens[ID(piece)].startswith(SPECIAL_PREFIX)
    for token_id in range(VOCAB):
        if token_id not in specials and TOKENIZER.byte_value(token_id) < 0:
            assert tokens[token_id] == TOKENIZER.decode([token_id]).encode(), token_id
    assert [t for t in range(VOCAB) if t not in specials and not tokens[t]] == []  # nothing decodes to nothing
    # A request's own eos ids are special too: its text can never hold them.
    comma = TOKENIZER.encode("。")[0]
    assert comma in token_bytes(TOKENIZER, (comma,), VOCAB)[1]


@pytest.mark.parametrize("regex", [r"[ǀ‖▀ \n😀🍙a]{4,10}", r"ǀ‖▀ (😀|🍙)\n", r"[ぁ-ん]{2}[ァ-ン]\t[0-9]{2}",
                                   r"(猫|犬) です\n{1,2}"])
def test_random_walks_decode_to_whole_matches(compiler, regex) -> None:
    """Tokens whose text does not encode back to them (<KIGOU>, <U2000U2BFF>, <BLOCK>, emoji classes) are allowed where
    their text is, and byte tokens spell what no piece does: whatever is drawn, the decoded text matches. Where the
    grammar forces its text (the rest of a fixed string) llguidance offers that text's tokenization, which must spell
    it: the tokenizer's own would turn "▀" into <U2000U2BFF> ("‖"), so the text's bytes are offered instead."""
    rng = random.Random(0)
    drawn: set[int] = set()
    for _ in range(40):
        matcher, tokens = compiler.matcher(StructuredOutputs(regex=regex), EOS), []
        while True:
            token = rng.choice(sorted(allowed(matcher)))
            if token == EOS[0]:
                break
            assert matcher.accept(token)
            tokens.append(token)
        assert matcher.is_complete and re.fullmatch(regex, TOKENIZER.decode(tokens)), TOKENIZER.decode(tokens)
        drawn.update(tokens)
    if regex.startswith("[ǀ"):  # the class tokens were reachable, and drawn
        assert {ID("<KIGOU>"), ID("<U2000U2BFF>"), ID("<BLOCK>"), ID("<SP>"), ID("<BR>")} <= drawn


def test_special_tokens_are_never_allowed_and_eos_only_at_an_end(compiler) -> None:
    matcher = compiler.matcher(StructuredOutputs(regex="<\\|startoftext\\|>|a"), EOS)
    first = allowed(matcher)
    assert ID("<|startoftext|>") not in first and EOS[0] not in first and ID("a") in first
    assert matcher.accept(ID("a")) and allowed(matcher) == {EOS[0]}


def test_masks_unpack_on_the_device_and_mask_greedy_and_sampled_rows(compiler) -> None:
    choice = compiler.matcher(StructuredOutputs(choice=("はい", "いいえ")), EOS)
    masks = grammar_masks([(choice, 1)], 3)  # rows 0 and 2: no constraint
    assert masks.shape == (3, mask_words(VOCAB)) and (masks[[0, 2]] == -1).all()
    unpacked = allowed_tokens(torch.from_numpy(masks), VOCAB)
    assert unpacked[0].all() and unpacked[2].all() and set(unpacked[1].nonzero().flatten().tolist()) == allowed(choice)
    logits = torch.randn(3, VOCAB)
    rows = dict(top_k=torch.zeros(3, dtype=torch.int64), top_p=torch.ones(3), penalty=torch.ones(3),
                seeds=torch.arange(3), steps=torch.zeros(3, dtype=torch.int64), seen=torch.zeros(3, VOCAB, dtype=bool))
    for temperature in (0.0, 1.0):
        ids = sample_rows(logits, temperature=torch.full((3,), temperature), allowed=unpacked, **rows)
        assert ids[1].item() in allowed(choice)
        assert ids[0].item() == sample_rows(logits, temperature=torch.full((3,), temperature), **rows)[0].item()


def test_a_failed_matcher_allows_nothing(compiler) -> None:
    matcher = compiler.matcher(StructuredOutputs(regex="[0-9]"), EOS)
    assert not matcher.accept(ID("<SP>")) and matcher.failed
    assert allowed(matcher) == set()


def test_compiles_are_cached_per_grammar_and_eos(compiler) -> None:
    before = compiler.num_compiles
    spec = StructuredOutputs(json={"type": "object", "properties": {"a": {"type": "integer"}}})
    first, second = compiler.matcher(spec, EOS), compiler.matcher(spec, EOS)
    assert compiler.num_compiles == before + 1
    assert first.accept(ID("{")) and allowed(second) == allowed(compiler.matcher(spec, EOS))  # copies: independent
    compiler.matcher(spec, (ID("。"),))
    assert compiler.num_compiles == before + 2

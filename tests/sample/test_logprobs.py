"""Logprobs against transformers in fp32: generated tokens' and prompt tokens' logprobs and their top alternatives
equal log_softmax of transformers' logits within 1e-4, on both backends (the triton one under the interpreter: a
tiny model, one short request), and so do Engine.score's. Also what they change in the step loop: prompts scored
whatever the prefix cache holds, requests that only score their prompt, logprobs in updates, and no logprob work
in a step where no request asks."""

from dataclasses import replace

import pytest
import torch

from hayabusa.engine.api import Engine
from hayabusa.engine.core.paged_engine import PagedEngine
from hayabusa.engine.oracle.reference_generate import reference_outputs
from hayabusa.engine.oracle.reference_model import ReferenceModel
from hayabusa.engine.outputs import TokenLogprobs
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.engine.worker import model_runner
from hayabusa.tokenizer import Tokenizer

from devices import DEVICE
from hf_oracle import random_hf_model

TOLERANCE = 1e-4
TOKENIZER = Tokenizer.from_pretrained()
CPU = torch.device("cpu")
PROMPTS = [[5, 17, 9, 3, 77, 1, 2], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]]
GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=5, prompt_logprobs=3)
# Logprobs come from the raw logits: temperature, top-k and the penalty change what is drawn, not the logprobs.
SAMPLED = SamplingParams(max_new_tokens=6, ignore_eos=True, do_sample=True, temperature=0.7, top_k=10,
                         repetition_penalty=1.2, seed=3, logprobs=2, prompt_logprobs=0, num_return_sequences=2)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def hf():
    return random_hf_model(7, hidden=64, heads=4, layers=2, vocab=101, max_positions=64)


def make_engine(hf, backend: str = "reference", device: torch.device = CPU,
                max_num_batched_tokens: int | None = None) -> Engine:
    _, config, state_dict = hf
    state_dict = {name: tensor.to(device) for name, tensor in state_dict.items()}
    return Engine(config, state_dict, TOKENIZER, backend=backend, device=device,
                  kv_cache_blocks=32, block_size=4, max_num_batched_tokens=max_num_batched_tokens)


def hf_logprobs(hf, tokens: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits over tokens: [len(tokens), vocab]; row p scores token p + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf[0](torch.tensor([tokens])).logits[0].float(), dim=-1)


def assert_entry(entry: TokenLogprobs, expected: torch.Tensor, token: int, num_top: int) -> None:
    """entry: one position's logprobs; expected: log_softmax [vocab] of the logits that predict it."""
    assert entry.token_id == token
    assert abs(entry.logprob - expected[token].item()) <= TOLERANCE
    top = expected.topk(num_top)
    assert [token_id for token_id, _ in entry.top] == top.indices.tolist()
    assert all(abs(logprob - want) <= TOLERANCE for (_, logprob), want in zip(entry.top, top.values.tolist(),
                                                                              strict=True))


def assert_logprobs_match_transformers(hf, output, params: SamplingParams) -> None:
    prompt, tokens = output.prompt_token_ids, output.prompt_token_ids + output.token_ids
    expected = hf_logprobs(hf, tokens)
    assert len(output.logprobs) == len(output.token_ids) == params.max_new_tokens
    for i, entry in enumerate(output.logprobs):
        assert_entry(entry, expected[len(prompt) - 1 + i], output.token_ids[i], params.logprobs)
    assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(prompt)
    for p in range(1, len(prompt)):
        assert_entry(output.prompt_logprobs[p], expected[p - 1], prompt[p], params.prompt_logprobs)


# Budget 5: the prompts (7 and 12 tokens) run in chunks beside the decodes, each chunk scoring its own positions.
@pytest.mark.parametrize("budget", [None, 5], ids=["whole-prompts", "chunked"])
def test_logprobs_equal_transformers_whatever_the_prefix_cache_holds(hf, budget) -> None:
    engine = make_engine(hf, max_num_batched_tokens=budget)
    engine.generate(PROMPTS, max_new_tokens=2)  # publishes the prompts' blocks: a plain request would hit them
    outputs = engine.generate(PROMPTS, [GREEDY, SAMPLED])
    assert len(outputs) == 3  # the sampled prompt's two completions come second and third
    assert_logprobs_match_transformers(hf, outputs[0], GREEDY)
    for output in outputs[1:]:
        assert_logprobs_match_transformers(hf, output, SAMPLED)
    assert outputs[1].token_ids != outputs[2].token_ids  # two completions, one scoring of their shared prompt
    assert outputs[1].prompt_logprobs is outputs[2].prompt_logprobs
    assert engine.paged.stats().num_free_blocks == 32


@pytest.mark.filterwarnings("ignore::hayabusa.engine.platform.devices.InterpreterWarning")  # a tiny model, 2 tokens
def test_logprobs_on_the_triton_backend(hf) -> None:
    engine = make_engine(hf, "triton", DEVICE)
    params = replace(GREEDY, max_new_tokens=2, logprobs=2, prompt_logprobs=2)
    (output,) = engine.generate([PROMPTS[0][:5]], params)
    assert_logprobs_match_transformers(hf, output, params)


def test_score_equals_transformers_and_reuses_shared_contexts(hf) -> None:
    engine = make_engine(hf)
    context, other = PROMPTS[1], PROMPTS[0]
    greedy = engine.generate(context, max_new_tokens=3)[0].token_ids
    cached = []
    allocate = engine.paged.block_manager.allocate
    engine.paged.block_manager.allocate = lambda seq, limit=None: (allocate(seq, limit),
                                                                   cached.append(seq.num_cached_tokens))
    scores = engine.score([context, context, other], [greedy, [7, 8], [60]])
    for score, ctx, continuation in zip(scores, [context, context, other], [greedy, [7, 8], [60]], strict=True):
        expected = hf_logprobs(hf, ctx + continuation)
        want = [expected[len(ctx) - 1 + i, token].item() for i, token in enumerate(continuation)]
        assert score.token_ids == continuation
        assert all(abs(got - w) <= TOLERANCE for got, w in zip(score.token_logprobs, want, strict=True))
        assert abs(score.total_logprob - sum(want)) <= TOLERANCE
        picks = [expected[len(ctx) - 1 + i].argmax().item() for i in range(len(continuation))]
        assert score.is_greedy == (picks == continuation)
    assert scores[0].is_greedy and not scores[1].is_greedy
    # The context's full blocks (12 tokens, blocks of 4: the first two, before the position that scores) were hit.
    assert cached == [8, 8, 0]
    with pytest.raises(ValueError, match="pair 0: the context is empty"):
        engine.score("", "大阪")
    with pytest.raises(ValueError, match="got 2 contexts but 1 continuations"):
        engine.score(["a", "b"], ["c"])


def test_updates_carry_logprobs_and_prompt_only_requests_end_after_their_prefill(hf) -> None:
    paged = make_engine(hf).paged
    generating = paged.add_request(PROMPTS[0], replace(GREEDY, max_new_tokens=3))
    scoring = paged.add_request(PROMPTS[1], SamplingParams(max_new_tokens=0, prompt_logprobs=1))
    silent = paged.add_request(PROMPTS[1], SamplingParams(max_new_tokens=0))
    updates = []
    while paged.has_unfinished_requests():
        updates += paged.step()
    mine = [u for u in updates if u.request_id == generating]
    final = mine[-1].finished
    assert [u.new_logprobs for u in mine] == [[entry] for entry in final.logprobs]
    assert mine[0].prompt_logprobs == final.prompt_logprobs and all(u.prompt_logprobs is None for u in mine[1:])
    (only,) = [u for u in updates if u.request_id == scoring]
    assert (only.new_token_ids, only.finished.token_ids, only.finished.finish_reason) == ([], [], "length")
    assert only.prompt_logprobs == only.finished.prompt_logprobs and len(only.prompt_logprobs) == len(PROMPTS[1])
    (quiet,) = [u for u in updates if u.request_id == silent]
    assert quiet.finished.prompt_logprobs is None and quiet.finished.logprobs is None
    assert paged.stats().num_free_blocks == 32


def test_a_step_where_no_request_asks_computes_no_logprob(hf, monkeypatch) -> None:
    calls = []
    for name in ("token_logprobs", "prompt_logprobs"):
        original = getattr(model_runner, name)
        monkeypatch.setattr(model_runner, name, lambda *args, _f=original, _n=name: (calls.append(_n), _f(*args))[1])
    engine = make_engine(hf)
    engine.generate(PROMPTS, [SamplingParams(max_new_tokens=4), replace(SAMPLED, logprobs=None, prompt_logprobs=None)])
    assert calls == []
    engine.generate(PROMPTS[:1], replace(GREEDY, max_new_tokens=3))
    assert calls == ["prompt_logprobs", "token_logprobs"] + ["token_logprobs"] * 2  # the prefill, then 2 decodes


def test_a_one_token_prompt_has_nothing_to_score(hf) -> None:
    (output,) = make_engine(hf).generate([[9]], SamplingParams(max_new_tokens=1, prompt_logprobs=2))
    assert output.prompt_logprobs == [None] and output.logprobs is None and len(output.token_ids) == 1


def test_prompt_scoring_in_padded_chunks_of_the_decode_batch_sizes(hf) -> None:
    """The triton op set runs the LM head only at decode batch sizes: 11 scored positions in chunks of
    max_num_seqs = 4 rows (the last padded), forced on the torch op set here."""
    _, config, state_dict = hf
    engine = PagedEngine(config, state_dict, TOKENIZER, device="cpu", ops="torch", kv_cache_blocks=32, block_size=4,
                         max_num_seqs=4)
    engine.runner.bucketed = True
    rows = []
    lm_head = engine.model.lm_head
    engine.model.lm_head = lambda hidden, out=None: (rows.append(hidden.shape[0]), lm_head(hidden, out))[1]
    params = replace(GREEDY, max_new_tokens=1, logprobs=1)
    (output,) = engine.generate([PROMPTS[1]], [params])
    assert_logprobs_match_transformers(hf, output, params)
    assert rows == [1, 4, 4, 4]  # the last token's logits, then the 11 scored positions


def test_the_reference_loop_gives_the_same_logprobs_and_refuses_what_it_cannot_do(hf) -> None:
    _, config, state_dict = hf
    reference = ReferenceModel(config, state_dict)
    params = replace(GREEDY, prompt_logprobs=None)
    (want,) = make_engine(hf).generate(PROMPTS[:1], params)
    (got,) = reference_outputs(reference, TOKENIZER, PROMPTS[:1], [params])
    assert got.token_ids == want.token_ids
    for mine, theirs in zip(got.logprobs, want.logprobs, strict=True):
        assert mine.token_id == theirs.token_id and [t for t, _ in mine.top] == [t for t, _ in theirs.top]
        assert abs(mine.logprob - theirs.logprob) <= TOLERANCE
    for refused in (GREEDY, replace(params, num_return_sequences=2), replace(params, max_new_tokens=0)):
        with pytest.raises(ValueError, match="the reference loop generates one completion"):
            reference_outputs(reference, TOKENIZER, PROMPTS[:1], [refused])

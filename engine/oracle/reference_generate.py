"""Generation on the reference model: one left-padded batch, a contiguous KV cache, a token per step.

The plain loop users run on a CPU and the oracle the paged engine's outputs are compared with. It computes sampled
tokens' logprobs (SamplingParams.logprobs) and refuses what only the paged engine does: prompt logprobs, several
completions per prompt, max_new_tokens 0, structured outputs. `reference_outputs` also runs beam search
(engine.oracle.reference_beams).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from hayabusa.engine.oracle.reference_beams import reference_beam_outputs
from hayabusa.engine.oracle.reference_model import ReferenceModel
from hayabusa.engine.oracle.reference_sampler import sample_next_tokens
from hayabusa.engine.outputs import GenerationOutput, OutputBuilder
from hayabusa.engine.sample.logprobs import token_logprobs
from hayabusa.engine.sample.seeds import request_seed
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.tokenizer import Tokenizer

# (request index, text delta, the finished output or None)
GenerationEvent = tuple[int, str, GenerationOutput | None]


def reference_generate(model: ReferenceModel, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
                       params: Sequence[SamplingParams]) -> Iterator[GenerationEvent]:
    """Run all prompts as one batch; yield text deltas as tokens are sampled. Inputs are validated by the caller."""
    _refuse_structured(params)
    for p in params:
        if p.num_beams > 1:
            raise ValueError("beam search does not stream; reference_outputs runs it (engine.oracle.reference_beams)")
        if p.prompt_logprobs is not None or p.num_candidates != 1 or p.max_new_tokens == 0:
            raise ValueError("the reference loop generates one completion (no best_of candidates) of at least one "
                             "token per prompt, without prompt logprobs; the paged engine (Engine.generate) does the "
                             "rest")
    eos = model.config.eos_token_id
    builders = [OutputBuilder(tokenizer, prompt, p, eos) for prompt, p in zip(prompts, params, strict=True)]
    seeds = [request_seed(p) for p in params]
    seen = [list(prompt) for prompt in prompts]
    batch, longest = len(prompts), max(len(prompt) for prompt in prompts)
    max_len = longest + max(p.max_new_tokens for p in params) - 1
    device = model.device

    # Left padding: every row's last prompt token sits in slot longest - 1, so one step serves all rows.
    input_ids = torch.zeros(batch, longest, dtype=torch.long)
    key_mask = torch.zeros(batch, max_len, dtype=torch.bool)
    for b, prompt in enumerate(prompts):
        input_ids[b, longest - len(prompt):] = torch.tensor(prompt)
        key_mask[b, longest - len(prompt):] = True
    input_ids, key_mask = input_ids.to(device), key_mask.to(device)
    positions = (key_mask[:, :longest].long().cumsum(-1) - 1).clamp_min(0)  # [B, longest]
    next_position = positions[:, -1:] + 1  # [B, 1]

    cache = model.new_cache(batch, max_len)
    logits = model(input_ids, positions, cache, key_mask[:, :longest], last_token_only=True)[:, 0]
    while True:
        tokens = sample_next_tokens(logits, params, seen, seeds, [len(b.token_ids) for b in builders], eos)
        logprobs = token_logprobs(logits, tokens).copy_to_host(pinned=False) \
            if any(b.cumulative_logprob is not None for b in builders) else None
        for b, token in enumerate(tokens.tolist()):
            if builders[b].finished:
                continue
            seen[b].append(token)
            if builders[b].cumulative_logprob is not None:
                builders[b].record_logprobs(logprobs, b, token)
            delta = builders[b].append(token)
            yield b, delta, builders[b].result() if builders[b].finished else None
        if all(builder.finished for builder in builders):
            return
        logits = model(tokens[:, None], next_position, cache, key_mask[:, :cache.length + 1],
                       last_token_only=True)[:, 0]
        # Finished rows keep riding along; clamping keeps their (ignored) positions inside the rotary table.
        next_position = (next_position + 1).clamp_max(model.config.max_position_embeddings - 1)


def reference_outputs(model: ReferenceModel, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
                      params: Sequence[SamplingParams]) -> list[GenerationOutput]:
    """Every request's outputs in prompt order: reference_generate run to the end, or for a beam request
    (num_beams > 1) its num_return_sequences best hypotheses, consecutive and best first."""
    _refuse_structured(params)
    outputs = {i: reference_beam_outputs(model, tokenizer, prompts[i], p) for i, p in enumerate(params)
               if p.num_beams > 1}
    plain = [i for i, p in enumerate(params) if p.num_beams == 1]
    if plain:
        events = reference_generate(model, tokenizer, [prompts[i] for i in plain], [params[i] for i in plain])
        for index, _, finished in events:
            if finished is not None:
                outputs[plain[index]] = [finished]
    return [out for i in range(len(prompts)) for out in outputs[i]]


def _refuse_structured(params: Sequence[SamplingParams]) -> None:
    if any(p.structured_outputs is not None for p in params):
        raise ValueError("structured_outputs run on the paged engine (Engine.generate) only: the reference loop has no "
                         "grammar engine")

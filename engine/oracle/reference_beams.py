"""Beam search on the reference model: the oracle the paged engine's beams are checked against.

One request at a time, its num_beams beams as the rows of one contiguous KV cache. Each step every new beam takes a
copy of its parent's cache row (KVCache.reorder), as transformers reorders its cache by the beam indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from hayabusa.engine.decoding.beam_search import BeamSearch, beam_logprobs
from hayabusa.engine.oracle.reference_model import ReferenceModel
from hayabusa.engine.outputs import GenerationOutput, OutputBuilder
from hayabusa.engine.sampling_params import SamplingParams, eos_token_ids
from hayabusa.tokenizer import Tokenizer


def reference_beam_outputs(model: ReferenceModel, tokenizer: Tokenizer, prompt: Sequence[int],
                           params: SamplingParams) -> list[GenerationOutput]:
    """The num_return_sequences best hypotheses of one prompt, best first; each output's `score` is transformers'
    sequences_scores. Inputs are validated by the caller (SamplingParams refuses what beams do not support)."""
    eos = model.config.eos_token_id
    search = BeamSearch.from_params(params, eos_token_ids(params, eos), model.device)
    device = model.device
    cache = model.new_cache(1, len(prompt) + params.max_new_tokens - 1)  # the last token is never fed back
    logits = model(torch.tensor([list(prompt)], device=device), cache=cache, last_token_only=True)[:, 0]  # [1, V]
    beams = [list(prompt)]  # each beam's tokens, prompt included (the processors read them)
    while not (step := search.step(beam_logprobs(logits, params, beams, search.steps, eos))).done:
        beams = [beams[parent] + [token] for parent, token in zip(step.parents, step.tokens, strict=True)]
        cache.reorder(torch.tensor(step.parents, device=device))
        tokens = torch.tensor(step.tokens, device=device)
        logits = model(tokens[:, None], cache=cache, last_token_only=True)[:, 0]  # [num_beams, V]

    outputs = []
    for hypothesis in search.results(params.num_return_sequences):
        builder = OutputBuilder(tokenizer, prompt, params, eos)
        for token in hypothesis.token_ids:
            builder.append(token)
        outputs.append(replace(builder.result(), score=hypothesis.score))
    return outputs

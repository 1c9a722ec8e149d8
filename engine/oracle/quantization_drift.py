"""How far a quantized model drifts from the fp model it was made from: both run as float32 reference models on the
same prompts, the quantized one on its dequantized weights. Reported by `hayabusa verify`, not checked: how much
drift is acceptable is a question of quality, and random weights say little about quality (README: quantization).

  - logits at every prompt position: max |quantized - fp| / max |fp|, and the mean KL divergence KL(fp || quantized)
    of the next-token distributions (nats);
  - top-1 agreement at every prompt position;
  - greedy decoding from each prompt: how many tokens both models generate alike before the first difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hayabusa.engine.oracle.reference_generate import reference_outputs
from hayabusa.engine.oracle.reference_model import ReferenceModel
from hayabusa.engine.sampling_params import SamplingParams
from hayabusa.tokenizer import Tokenizer


@dataclass(frozen=True)
class Drift:
    max_logit_error: float  # max |quantized - fp| / max |fp| over every prompt position
    mean_kl: float  # mean over positions of KL(fp || quantized), nats
    top1_agree: int  # positions whose most likely token is the same
    positions: int
    greedy_alike: list[int]  # per prompt: generated tokens identical before the first difference
    steps: int

    def report_lines(self) -> list[str]:
        return [f"logits     max |err| / max |fp logit| {self.max_logit_error:.3e}, mean KL(fp || quantized) "
                f"{self.mean_kl:.3e} nats",
                f"top-1      {self.top1_agree}/{self.positions} prompt positions agree "
                f"({100 * self.top1_agree / self.positions:.2f}%)",
                f"greedy     tokens alike before the first difference: "
                f"{', '.join(f'{n}/{self.steps}' for n in self.greedy_alike)}"]


@torch.no_grad()
def measure_drift(fp: ReferenceModel, quantized: ReferenceModel, tokenizer: Tokenizer, prompts: Sequence[list[int]],
                  steps: int) -> Drift:
    """Both models in float32 on the same prompts (token ids); see the module docstring."""
    error = kl_sum = 0.0
    agree = positions = 0
    for ids in prompts:
        input_ids = torch.tensor([ids], device=fp.device)
        fp_logits, q_logits = fp(input_ids)[0], quantized(input_ids.to(quantized.device))[0].to(fp.device)  # [T, V]
        error = max(error, (q_logits - fp_logits).abs().max().item() / max(fp_logits.abs().max().item(), 1e-30))
        fp_logprobs, q_logprobs = fp_logits.log_softmax(-1), q_logits.log_softmax(-1)
        kl_sum += (fp_logprobs.exp() * (fp_logprobs - q_logprobs)).sum().item()
        agree += int((fp_logits.argmax(-1) == q_logits.argmax(-1)).sum())
        positions += len(ids)
    params = [SamplingParams(max_new_tokens=steps, ignore_eos=True)] * len(prompts)
    fp_tokens = [out.token_ids for out in reference_outputs(fp, tokenizer, prompts, params)]
    q_tokens = [out.token_ids for out in reference_outputs(quantized, tokenizer, prompts, params)]
    alike = [next((k for k, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), steps)
             for x, y in zip(fp_tokens, q_tokens, strict=True)]
    return Drift(error, kl_sum / positions, agree, positions, alike, steps)

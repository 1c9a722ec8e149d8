"""What the suite runs: the scenario sizes per mode and the (seeded, engine-independent) prompts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# Ids below this are ordinary vocabulary entries; the tail of the vocabulary holds <|byteN|>, emoji classes and
# the special tokens, which a random prompt should not be made of.
PROMPT_VOCAB_LIMIT = 31700


@dataclass(frozen=True)
class SuiteSizes:
    name: str
    decode_batches: tuple[int, ...]
    decode_prompt_len: int
    decode_gen_len: int
    prefill_prompt_lens: tuple[int, ...]
    throughput_requests: int
    throughput_prompt_len: int
    throughput_gen_len: int
    mixed_prompt_lens: tuple[int, int]  # inclusive range, drawn uniformly per request
    mixed_gen_lens: tuple[int, int]
    static_batch: int  # most requests a static-batching engine (transformers, reference) gets per generate call
    tokenizer_chars: int
    repeats: int
    warmup: int
    roofline_copy_bytes: int
    roofline_matmul_size: int
    long_decode_prompt_len: int | None = None  # also decode one sequence after this long a prompt (None: not run)
    # the serve scenario: concurrent streaming users (locust), each request prompt + generated tokens, for a window
    serve_users: tuple[int, ...] = (1, 8, 32, 128)
    serve_prompt_len: int = 128
    serve_gen_len: int = 128
    serve_seconds: float = 60.0  # per number of users

    @property
    def calls(self) -> int:
        """Calls behind one figure: the warm-up ones, then the timed ones."""
        return self.warmup + self.repeats

    def as_dict(self) -> dict:
        return asdict(self)


SIZES: dict[str, SuiteSizes] = {
    # The figures the issue asks for, meant for a GPU.
    "full": SuiteSizes(
        name="full", decode_batches=(1, 8, 32, 128), decode_prompt_len=128, decode_gen_len=128,
        prefill_prompt_lens=(128, 512, 2048), throughput_requests=256, throughput_prompt_len=128,
        throughput_gen_len=128, mixed_prompt_lens=(16, 512), mixed_gen_lens=(16, 256), static_batch=128,
        tokenizer_chars=200_000, repeats=5, warmup=1, roofline_copy_bytes=1 << 30, roofline_matmul_size=8192,
    ),
    # bench/gpu_first_light.sh: issue 9's figures on one GPU within its time budget (decode and prefill only).
    "gpu": SuiteSizes(
        name="gpu", decode_batches=(1, 8, 64), decode_prompt_len=128, decode_gen_len=128,
        prefill_prompt_lens=(2048,), throughput_requests=64, throughput_prompt_len=128,
        throughput_gen_len=128, mixed_prompt_lens=(16, 512), mixed_gen_lens=(16, 256), static_batch=64,
        tokenizer_chars=200_000, repeats=3, warmup=1, roofline_copy_bytes=1 << 30, roofline_matmul_size=8192,
        long_decode_prompt_len=1920,
    ),
    # Scaled down so the whole suite runs in a few minutes on a 2-core CPU with the tiny preset.
    "cpu": SuiteSizes(
        name="cpu", decode_batches=(1, 8, 32), decode_prompt_len=128, decode_gen_len=16,
        prefill_prompt_lens=(128, 256, 512), throughput_requests=32, throughput_prompt_len=128,
        throughput_gen_len=16, mixed_prompt_lens=(16, 256), mixed_gen_lens=(4, 32), static_batch=32,
        tokenizer_chars=20_000, repeats=3, warmup=1, roofline_copy_bytes=128 << 20, roofline_matmul_size=1024,
        serve_prompt_len=32, serve_gen_len=16, serve_seconds=30.0,
    ),
    # Smallest sizes that still exercise every code path: for tests and a quick look.
    "smoke": SuiteSizes(
        name="smoke", decode_batches=(1, 4), decode_prompt_len=16, decode_gen_len=4,
        prefill_prompt_lens=(16, 32), throughput_requests=4, throughput_prompt_len=16,
        throughput_gen_len=4, mixed_prompt_lens=(4, 24), mixed_gen_lens=(2, 5), static_batch=4,
        tokenizer_chars=2_000, repeats=1, warmup=1, roofline_copy_bytes=8 << 20, roofline_matmul_size=256,
        serve_users=(1, 2), serve_prompt_len=8, serve_gen_len=4, serve_seconds=2.0,
    ),
}


def sizes_for(name: str, device: torch.device) -> SuiteSizes:
    """`auto` picks `full` on a GPU and `cpu` on a CPU."""
    if name == "auto":
        name = "full" if device.type == "cuda" else "cpu"
    try:
        return SIZES[name]
    except KeyError:
        raise ValueError(f"unknown --sizes {name!r}; choose auto or one of {', '.join(SIZES)}") from None


def random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    """One prompt of random ordinary token ids per length; the same seed gives every engine the same prompts."""
    return prompt_sets(lengths, seed, calls=1)[0]


def prompt_sets(lengths: list[int], seed: int, calls: int) -> list[list[list[int]]]:
    """`calls` sets of random prompts of these lengths: a new set for each call behind a figure, the same sets in
    the same order for every engine. A prompt timed twice would be a prefix-cache hit the second time (hayabusa
    keeps finished prompts' blocks), and its prefill would be skipped while the figure counts it."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, PROMPT_VOCAB_LIMIT, (n,), generator=generator).tolist() for n in lengths]
            for _ in range(calls)]


def grounded_prompt_sets(count: int, passage_len: int, seed: int, calls: int) -> list[list[list[int]]]:
    """Input-grounded prompts, a new set per call (see prompt_sets): a passage, then its first quarter again, so the
    natural continuation quotes the rest of the passage (what prompt-lookup speculation drafts from)."""
    return [[passage + passage[: passage_len // 4] for passage in passages]
            for passages in prompt_sets([passage_len] * count, seed, calls)]


def grounded_len(passage_len: int) -> int:
    """Tokens of a grounded_prompt_sets prompt."""
    return passage_len + passage_len // 4


def mixed_lengths(count: int, length_range: tuple[int, int], seed: int) -> list[int]:
    low, high = length_range
    if not 1 <= low <= high:
        raise ValueError(f"length range must satisfy 1 <= low <= high, got {length_range}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (count,), generator=generator).tolist()


def _generating_workloads(sizes: SuiteSizes) -> list[tuple[str, int, int]]:
    """(what, prompt tokens, generated tokens) of each workload that decodes."""
    return [("decode", sizes.decode_prompt_len, sizes.decode_gen_len),
            ("speculation", grounded_len(sizes.decode_prompt_len), sizes.decode_gen_len),
            ("long decode", sizes.long_decode_prompt_len or 0, sizes.decode_gen_len),
            ("throughput", sizes.throughput_prompt_len, sizes.throughput_gen_len),
            ("mixed throughput", sizes.mixed_prompt_lens[1], sizes.mixed_gen_lens[1]),
            ("serve", sizes.serve_prompt_len, sizes.serve_gen_len)]


def check_sizes_fit(sizes: SuiteSizes, max_positions: int) -> None:
    """Raise before anything runs if a decode / throughput workload needs more positions than the model has
    (prefill cuts its longest prompt to fit instead: see scenarios.run_prefill)."""
    for what, prompt_len, gen_len in _generating_workloads(sizes):
        if prompt_len + gen_len > max_positions:
            raise ValueError(
                f"--sizes {sizes.name}: {what} needs prompt {prompt_len} + generated {gen_len} tokens, more than "
                f"the model's max_position_embeddings {max_positions}; use smaller --sizes, "
                "--decode-tokens or --long-decode-prompt"
            )
    if max(sizes.decode_batches) > sizes.static_batch:
        raise ValueError(f"--sizes {sizes.name}: decode batch {max(sizes.decode_batches)} exceeds static_batch "
                         f"{sizes.static_batch}, so it would not be decoded as one batch")
    if sizes.decode_gen_len < 2:
        raise ValueError(f"--sizes {sizes.name}: decode_gen_len must be >= 2 to time a decode step")


def longest_sequence(sizes: SuiteSizes) -> int:
    """Most tokens (prompt + generated) any one sequence of these workloads holds."""
    return max(max(sizes.prefill_prompt_lens) + 1,
               *(prompt_len + gen_len for _, prompt_len, gen_len in _generating_workloads(sizes)))


def workload_kv_blocks(sizes: SuiteSizes, block_size: int = 16) -> int:
    """KV blocks for static_batch sequences of the longest workload: the pool a CPU engine needs here (its own
    default holds several full-length sequences: 5 GiB in fp32 for the 2.7B shape)."""
    return sizes.static_batch * -(-longest_sequence(sizes) // block_size)

"""The measured scenarios: each times one runner on one workload and returns a BenchRecord.

Every engine sees the same prompts (seeded by scenario and case, never by engine) and the same forced token
counts; each figure is the median of `repeats` timed calls after `warmup` excluded ones. Each call gets prompts
of its own (workloads.prompt_sets), so no engine's prefix cache turns a timed prefill into a cache hit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from hayabusa.bench import roofline
from hayabusa.bench.records import BenchRecord
from hayabusa.bench.runners import BenchRunner, GenerateResult
from hayabusa.bench.timing import median, time_ms, time_once_ms
from hayabusa.bench.workloads import SuiteSizes, grounded_len, grounded_prompt_sets, mixed_lengths, prompt_sets
from hayabusa.engine.loading.config import ModelConfig

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def next_set(sets: list[list[list[int]]]) -> Callable[[], list[list[int]]]:
    """The prompt sets one per call, in order."""
    return iter(sets).__next__


def run_load(runner: BenchRunner, sizes: SuiteSizes) -> BenchRecord:
    """Checkpoint directory -> model ready on the device (hayabusa's Triton engine: every kernel shape warmed up).
    The warm-up load fills the OS page cache, so the figure is a warm-cache load (what a restarted server sees).
    Engines that compile kernels also report a start in a fresh process with an empty Triton cache (cold) and
    with the cache it filled (warm). Leaves the runner loaded."""
    checkpoint_bytes = sum(f.stat().st_size for f in runner.model_dir.iterdir() if f.suffix in CHECKPOINT_SUFFIXES)
    extra = {"checkpoint_bytes": checkpoint_bytes}
    runner.unload()  # its device memory must be free for the fresh processes
    starts = runner.start_times()
    if starts is not None:
        extra.update(cold_start_ms=starts[0], warm_start_ms=starts[1])
    warmups, samples = [], []
    for timed in [False] * sizes.warmup + [True] * sizes.repeats:
        runner.unload()
        (samples if timed else warmups).append(time_once_ms(runner.load, runner.device))
    ms = median(samples)
    return BenchRecord(runner.name, "load", "load", None, None, None, None, ms, None, None, None, sizes.repeats,
                       samples, warmups[0] if warmups else None, {**extra, "gb_per_s": checkpoint_bytes / ms / 1e6})


def run_decode(runner: BenchRunner, sizes: SuiteSizes, config: ModelConfig, device_roofline: roofline.DeviceRoofline,
               batch: int, prompt_len: int | None = None) -> BenchRecord:
    """ms per decode step with `batch` sequences decoded together after prompts of prompt_len tokens (default
    sizes.decode_prompt_len): in each timed run of gen_len tokens, the time from the first generated token to the
    last, over gen_len - 1 steps (the prefill is not in it)."""
    long_context = prompt_len is not None and prompt_len != sizes.decode_prompt_len
    prompt_len, gen_len = prompt_len or sizes.decode_prompt_len, sizes.decode_gen_len
    prompts = next_set(prompt_sets([prompt_len] * batch, (4000 if long_context else 1000) + batch, sizes.calls))
    results: list[GenerateResult] = []
    timing = time_ms(lambda: results.append(runner.generate(prompts(), [gen_len] * batch)), runner.device,
                     sizes.repeats, sizes.warmup)
    if any(r.decode_s is None for r in results):
        raise RuntimeError(f"{runner.name} split a decode batch of {batch}; its decode time is not one batch's")
    step_samples = [r.decode_s * 1e3 / (gen_len - 1) for r in results[sizes.warmup:]]
    ms_per_token = median(step_samples)
    weight_bytes = runner.weight_bytes_per_step(config, batch)  # in the format the runner holds: codes + scales
    step_bytes = roofline.mean_decode_step_bytes(config, batch, prompt_len, gen_len, runner.dtype.itemsize,
                                                 weight_bytes)
    floor_ms = device_roofline.decode_floor_ms(step_bytes)
    read_floor_ms = device_roofline.read_floor_ms(weight_bytes)
    case = f"batch{batch}-prompt{prompt_len}" if long_context else f"batch{batch}"
    return BenchRecord(
        runner.name, "decode", case, batch, prompt_len, gen_len, ms_per_token, median(timing.samples_ms),
        batch * 1e3 / ms_per_token, roofline.pct_of_floor(floor_ms, ms_per_token), "bandwidth", sizes.repeats,
        timing.samples_ms, timing.warmup_ms,
        {"step_samples_ms": step_samples, "bytes_per_step": step_bytes, "floor_ms_per_step": floor_ms,
         # the weights alone (what batch 1 is about): their bytes per step over the measured step time, as a
         # fraction of the copy bandwidth measured in this run
         "weight_format": runner.weight_format, "weight_bytes_per_step": weight_bytes,
         "weight_gb_per_s": weight_bytes / ms_per_token / 1e6,
         # the weights over the read bandwidth measured in this run: the floor of a batch-1 step on a CPU
         "pct_read_bandwidth_weights": None if read_floor_ms is None else roofline.pct_of_floor(read_floor_ms,
                                                                                                ms_per_token),
         "pct_copy_bandwidth_weights": roofline.pct_of_floor(device_roofline.decode_floor_ms(weight_bytes),
                                                             ms_per_token)},
    )


def run_prefill(runner: BenchRunner, sizes: SuiteSizes, config: ModelConfig,
                device_roofline: roofline.DeviceRoofline, prompt_len: int) -> BenchRecord:
    """Time to first token of one prompt: the prefill plus sampling one token. A prompt as long as the model's
    positions is cut by one to leave room for that token; the record holds the length actually run."""
    run_len = min(prompt_len, config.max_position_embeddings - 1)
    prompts = next_set(prompt_sets([run_len], 2000 + run_len, sizes.calls))
    timing = time_ms(lambda: runner.generate(prompts(), [1]), runner.device, sizes.repeats, sizes.warmup)
    ms = median(timing.samples_ms)
    flops = roofline.prefill_flops(config, 1, run_len)
    floor_ms = device_roofline.prefill_floor_ms(flops)
    return BenchRecord(runner.name, "prefill", f"prompt{prompt_len}", 1, run_len, 1, None, ms, run_len * 1e3 / ms,
                       roofline.pct_of_floor(floor_ms, ms), "matmul", sizes.repeats, timing.samples_ms,
                       timing.warmup_ms, {"flops": flops, "floor_ms": floor_ms, "requested_prompt_len": prompt_len})


PROMPT_LOOKUP_NUM_TOKENS = 10  # transformers' default draft length


def run_speculation(runner: BenchRunner, sizes: SuiteSizes) -> BenchRecord:
    """One input-grounded request (grounded_prompt_sets: a passage, then its start quoted again), decode_gen_len
    greedy tokens with prompt-lookup speculation: its time, the drafts' acceptance rate and the tokens each forward
    pass yields (a pass emits one token of its own plus the drafts it accepts), against requests of the same kind
    without it (other passages: the speculating calls' prompts would be prefix-cache hits)."""
    gen_lens = [sizes.decode_gen_len]
    prompts = next_set(grounded_prompt_sets(1, sizes.decode_prompt_len, 5000, sizes.calls))
    counts: list[tuple[int, int]] = []
    timing = time_ms(lambda: counts.append(runner.generate_prompt_lookup(prompts(), gen_lens,
                                                                         PROMPT_LOOKUP_NUM_TOKENS)),
                     runner.device, sizes.repeats, sizes.warmup)
    plain_prompts = next_set(grounded_prompt_sets(1, sizes.decode_prompt_len, 5001, sizes.calls))
    plain = time_ms(lambda: runner.generate(plain_prompts(), gen_lens), runner.device, sizes.repeats, sizes.warmup)
    drafted, accepted = counts[-1]
    ms, plain_ms = median(timing.samples_ms), median(plain.samples_ms)
    return BenchRecord(
        runner.name, "speculation", f"prompt-lookup-{PROMPT_LOOKUP_NUM_TOKENS}", 1,
        grounded_len(sizes.decode_prompt_len), gen_lens[0], None, ms, gen_lens[0] * 1e3 / ms, None, None,
        sizes.repeats, timing.samples_ms, timing.warmup_ms,
        {"draft_tokens": drafted, "accepted_tokens": accepted,
         "acceptance_rate": accepted / drafted if drafted else 0.0,
         # the prefill pass yields the first token; each later pass one of its own plus its accepted drafts
         "tokens_per_forward_pass": gen_lens[0] / (gen_lens[0] - accepted), "plain_ms": plain_ms,
         "speedup": plain_ms / ms},
    )


def throughput_workloads(sizes: SuiteSizes) -> Iterator[tuple[str, list[list[list[int]]], list[int]]]:
    """(case, a set of prompts per call, gen_lens): "uniform" (n x prompt / gen) and "mixed" (lengths drawn per
    request, the same in every set)."""
    n = sizes.throughput_requests
    yield ("uniform", prompt_sets([sizes.throughput_prompt_len] * n, 3000, sizes.calls),
           [sizes.throughput_gen_len] * n)
    prompt_lens = mixed_lengths(n, sizes.mixed_prompt_lens, seed=3001)
    yield "mixed", prompt_sets(prompt_lens, 3002, sizes.calls), mixed_lengths(n, sizes.mixed_gen_lens, seed=3003)


def run_throughput(runner: BenchRunner, sizes: SuiteSizes, case: str, sets: list[list[list[int]]],
                   gen_lens: list[int]) -> BenchRecord:
    """Offline: all requests submitted at once, wall time until the last token. tokens_per_s counts the
    requested generated tokens; extra.computed_tokens shows what static batching spent beyond them."""
    results: list[GenerateResult] = []
    prompts, next_prompts = sets[0], next_set(sets)
    timing = time_ms(lambda: results.append(runner.generate(next_prompts(), gen_lens)), runner.device,
                     sizes.repeats, sizes.warmup)
    ms = median(timing.samples_ms)
    generated, prompt_tokens = sum(gen_lens), sum(len(p) for p in prompts)
    return BenchRecord(
        runner.name, "throughput", case, len(prompts), round(prompt_tokens / len(prompts)),
        round(generated / len(prompts)), None, ms, generated * 1e3 / ms, None, None, sizes.repeats,
        timing.samples_ms, timing.warmup_ms,
        {"prompt_tokens": prompt_tokens, "generated_tokens": generated, "computed_tokens": results[-1].computed_tokens,
         "prompt_len_range": [min(map(len, prompts)), max(map(len, prompts))],
         "gen_len_range": [min(gen_lens), max(gen_lens)], "static_batch": getattr(runner, "static_batch", None),
         "total_tokens_per_s": (generated + prompt_tokens) * 1e3 / ms},
    )

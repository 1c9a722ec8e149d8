"""`hayabusa batch`: offline generation from a jsonl file, on one engine or (`--ray`) Ray Data's actor pool.

Each input line is {"prompt": text or token ids, ...} plus `Engine.generate`'s sampling keywords
(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed, stop, ignore_eos). Each output
line, in input order: {"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"}. Both paths
run the same `generate_lines` on batches of lines, so a greedy or seeded run gives the same file either way.
Needs no server dependency (only Ray with --ray).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from tqdm import tqdm

from hayabusa.engine.api import Engine
from hayabusa.engine.config import DTYPES
from hayabusa.engine.sampling import SamplingParams
from hayabusa.engine.server.cli import require

# One output line per input line, text only: several completions and logprobs are for the Python API and the server.
PER_LINE_UNSUPPORTED = frozenset({"num_return_sequences", "logprobs", "prompt_logprobs"})
SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams)) - PER_LINE_UNSUPPORTED


@dataclass(frozen=True)
class EngineSpec:
    """What every worker loads (picklable, for Ray)."""

    model: str
    revision: str | None = None
    backend: str | None = None
    device: str | torch.device | None = None
    dtype: str | None = None
    kv_cache_blocks: int | None = None

    def load(self) -> Engine:
        return Engine.from_pretrained(self.model, revision=self.revision, backend=self.backend, device=self.device,
                                      dtype=DTYPES.get(self.dtype), kv_cache_blocks=self.kv_cache_blocks)


def parse_line(text: str, where: str) -> tuple[str | list[int], SamplingParams]:
    """One input line -> (prompt, params); ValueError naming `where` (file:line) and the bad field."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(record, dict) or "prompt" not in record:
        raise ValueError(f"{where}: each line must be a JSON object with a \"prompt\"")
    prompt = record.pop("prompt")
    if not (isinstance(prompt, str) or isinstance(prompt, list) and all(type(t) is int for t in prompt)):
        raise ValueError(f"{where}: \"prompt\" must be a string or a list of token ids, got {prompt!r}")
    unsupported = sorted(set(record) & PER_LINE_UNSUPPORTED)
    if unsupported:
        raise ValueError(f"{where}: {unsupported[0]!r} is not supported by hayabusa batch (one text per line); use "
                         f"Engine.generate or the server")
    unknown = sorted(set(record) - SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; known: prompt, {', '.join(sorted(SAMPLING_FIELDS))}")
    try:
        return prompt, SamplingParams(**record)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    except TypeError as err:  # a string where a number belongs
        raise ValueError(f"{where}: a sampling field has the wrong type ({err})") from None


Numbered = Sequence[tuple[int, str]]  # (line number in the input file, line)


def generate_lines(engine: Engine, lines: Numbered, where: str) -> list[dict[str, Any]]:
    """Generate for some input lines on one engine; one result dict per line."""
    parsed = [parse_line(text, f"{where}:{number}") for number, text in lines]
    try:
        outputs = engine.generate([prompt for prompt, _ in parsed], [params for _, params in parsed])
    except ValueError as err:  # its "prompt i" counts from the first of these lines
        raise ValueError(f"{where}: lines {lines[0][0]}-{lines[-1][0]}: {err}") from None
    results = []
    for out in outputs:
        result = {"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                  "prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(out.token_ids)}
        if out.error is not None:
            result["error"] = out.error
        results.append(result)
    return results


def run_local(spec: EngineSpec, lines: Numbered, batch_size: int, where: str) -> Iterator[dict[str, Any]]:
    engine = spec.load()
    try:
        for start in range(0, len(lines), batch_size):
            yield from generate_lines(engine, lines[start: start + batch_size], where)
    finally:
        engine.close()


class _RayWorker:
    """One engine of Ray Data's actor pool."""

    def __init__(self, spec: dict[str, Any], where: str) -> None:
        self.engine = EngineSpec(**spec).load()
        self.where = where

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        numbers = [int(n) for n in batch["line_number"]]
        lines = [str(text) for text in batch["line"]]
        results = generate_lines(self.engine, list(zip(numbers, lines, strict=True)), self.where)
        return {"line_number": numbers, "result": [json.dumps(r, ensure_ascii=False) for r in results]}


def run_ray(spec: EngineSpec, lines: Numbered, batch_size: int, replicas: int, where: str
            ) -> Iterator[dict[str, Any]]:
    """Ray Data: `map_batches` over an actor pool of `replicas` engines (one GPU each on CUDA); results come back
    in input order."""
    import ray

    ray.init(ignore_reinit_error=True)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # ours counts lines
    on_gpu = str(spec.device or ("cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu")).startswith("cuda")
    spec = replace(spec, device="cuda" if on_gpu else "cpu")
    dataset = ray.data.from_items([{"line_number": number, "line": text} for number, text in lines],
                                  override_num_blocks=max(1, min(len(lines) // batch_size, 8 * replicas)))
    results = dataset.map_batches(_RayWorker, batch_size=batch_size, fn_constructor_kwargs={
        "spec": asdict(spec), "where": where}, compute=ray.data.ActorPoolStrategy(size=replicas),
        num_gpus=1 if on_gpu else 0, num_cpus=None if on_gpu else 1)
    rows = results.iter_rows()
    for (number, _), row in zip(lines, rows, strict=True):
        if row["line_number"] != number:  # never write a shuffled file
            raise RuntimeError(f"Ray Data returned line {row['line_number']} where line {number} belongs")
        yield json.loads(row["result"])


def run(args: argparse.Namespace) -> int:
    where = str(args.input)
    lines = [(number, text) for number, text in enumerate(args.input.read_text(encoding="utf-8").splitlines(), 1)
             if text.strip()]
    if not lines:
        raise ValueError(f"{where} holds no lines")
    for number, text in lines:  # fail on a bad line before any model loads
        parse_line(text, f"{where}:{number}")
    spec = EngineSpec(model=args.model, revision=args.revision, backend=args.backend, device=args.device,
                      dtype=args.dtype, kv_cache_blocks=args.kv_cache_blocks)
    if args.ray:
        require("ray", extra="ray")
        results = run_ray(spec, lines, args.batch_size, args.replicas, where)
    else:
        results = run_local(spec, lines, args.batch_size, where)
    partial = args.output.with_name(args.output.name + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        for result in tqdm(results, total=len(lines), desc="batch", unit="line"):
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
    partial.replace(args.output)  # a crash never leaves a short file under the output name
    return 0

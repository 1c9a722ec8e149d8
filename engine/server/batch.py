"""`hayabusa batch`: offline generation from a jsonl file, on one engine or (`--ray`) Ray Data's actor pool.

Each input line is {"prompt": text or token ids, ...} plus `Engine.generate`'s sampling keywords (batch_input.py
reads and checks them, all before any model loads, as it checks that --output can be written). Each output line, in
input order: {"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"}. Both paths run the same
`generate_lines` on batches of lines, so a greedy or seeded run gives the same file either way. The output appears
only complete: a failed or interrupted run leaves neither it nor its partial file. Needs no server dependency (only
Ray with --ray).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

import torch
from tqdm import tqdm

from hayabusa.engine.api import Engine
from hayabusa.engine.loading.config import DTYPES
from hayabusa.engine.server.batch_input import parse_line, read_lines
from hayabusa.engine.server.cli import require


@dataclass(frozen=True)
class EngineSpec:
    """What every worker loads (picklable, for Ray)."""

    model: str
    revision: str | None = None
    backend: str | None = None
    device: str | torch.device | None = None
    dtype: str | None = None
    kv_cache_blocks: int | None = None
    quantization: str | None = None  # a quant_schemes name: quantize while loading

    def load(self) -> Engine:
        return Engine.from_pretrained(self.model, revision=self.revision, backend=self.backend, device=self.device,
                                      dtype=DTYPES.get(self.dtype), kv_cache_blocks=self.kv_cache_blocks,
                                      quantization=self.quantization)


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
    lines = read_lines(args.input)
    for number, text in lines:  # fail on a bad line before any model loads
        parse_line(text, f"{where}:{number}")
    partial = args.output.with_name(args.output.name + ".partial")
    out = open_output(args.output, partial, args.input)
    try:
        with out:
            spec = EngineSpec(model=args.model, revision=args.revision, backend=args.backend, device=args.device,
                              dtype=args.dtype, kv_cache_blocks=args.kv_cache_blocks,
                              quantization=args.quantization)
            if args.ray:
                require("ray", extra="ray")
                results = run_ray(spec, lines, args.batch_size, args.replicas, where)
            else:
                results = run_local(spec, lines, args.batch_size, where)
            for result in tqdm(results, total=len(lines), desc="batch", unit="line"):
                out.write(json.dumps(result, ensure_ascii=False) + "\n")
        partial.replace(args.output)
    except BaseException:  # an error, Ctrl-C: no short file under either name
        partial.unlink(missing_ok=True)
        raise
    return 0


def open_output(output: Path, partial: Path, input_path: Path) -> IO[str]:
    """`partial` opened for writing, which proves `output` can be written, before any model loads; `output` takes
    its place once every line is done."""
    if output.is_dir():
        raise ValueError(f"--output {output} is a directory; give the file to write, e.g. {output / 'out.jsonl'}")
    if not output.parent.is_dir():
        raise ValueError(f"--output {output}: there is no directory {output.parent}")
    if output.exists() and output.samefile(input_path):
        raise ValueError(f"--output {output} is the --input file; write the results elsewhere")
    try:
        return partial.open("w", encoding="utf-8")
    except OSError as err:
        raise ValueError(f"--output {output}: cannot write {partial} ({err.strerror})") from None

"""Merge the results.json of several `hayabusa bench` runs of one checkpoint on one machine into one results triple,
`<device>-<date>.{json,md,png}`, so that engines timed in separate processes are compared side by side (the GPU
first light runs each engine as its own stage, under its own time limit).

The header (device, versions, commit, sizes, roofline) is the first run's; records, skips, failures and kernel
tables are every run's, in the order given; each record keeps the % of roofline its own run measured.

    python -m hayabusa.bench.merge_results --out DIR [--preset 2.7b] A/results.json B/results.json ...
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from hayabusa.bench.preflight import plot_library_missing
from hayabusa.bench.report import write_results

Results = dict[str, Any]


def merge(runs: list[Results]) -> Results:
    """One results dict from runs of the same model on the same device (ValueError naming the first that is not)."""
    if not runs:
        raise ValueError("nothing to merge: no results.json given")
    first = runs[0]
    for run in runs[1:]:
        for key in ("device", "dtype"):
            if run[key] != first[key]:
                raise ValueError(f"cannot merge runs of different {key}: {first[key]!r} and {run[key]!r}")
        if run["model"]["dir"] != first["model"]["dir"]:
            raise ValueError(f"cannot merge runs of different models: {first['model']['dir']} and "
                             f"{run['model']['dir']}")
    merged = dict(first)
    for key in ("records", "skipped", "errors", "decode_kernels", "warnings"):
        merged[key] = [item for run in runs for item in run.get(key, [])]
    for key in ("engines", "scenarios"):
        merged[key] = list(dict.fromkeys(item for run in runs for item in run[key]))
    merged["seconds"] = sum(run["seconds"] for run in runs)
    merged["launches_per_decode_step"] = next((run["launches_per_decode_step"] for run in runs
                                               if run.get("launches_per_decode_step", {}).get("by_batch")),
                                              first.get("launches_per_decode_step", {}))
    merged["machine_load"] = {"start": first["machine_load"].get("start"), "end": runs[-1]["machine_load"].get("end")}
    merged["merged_from"] = len(runs)
    return merged


def result_name(results: Results) -> str:
    """`<device>-<date>`: the GPU's name (a CPU run: cpu-<preset>), lower case, other characters as single dashes."""
    if results["device_type"] == "cuda":
        device = results["device"].split(" (")[0]
    else:
        device = "cpu-" + (results["model"]["preset"] or "model")
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") + "-" + results["created"][:10]


def write_merged(paths: list[Path], out: Path, preset: str | None = None) -> list[Path]:
    """Merge the runs at `paths` into out/<device>-<date>.{json,md,png} (no .png without matplotlib); the files.
    `preset`: the checkpoint is random weights of this preset (written by init-random), whatever its path says."""
    merged = merge([json.loads(path.read_text(encoding="utf-8")) for path in paths])
    if preset is not None:
        merged["model"] = {**merged["model"], "preset": preset, "random_weights": True}
    name = result_name(merged)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        for suffix, path in write_results(merged, Path(scratch), plot=plot_library_missing() is None).items():
            written.append(path.replace(out / f"{name}.{suffix}"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for <device>-<date>.{json,md,png}")
    parser.add_argument("--preset", default=None, help="the checkpoint is random weights of this preset")
    parser.add_argument("results", type=Path, nargs="+", help="results.json files, in the order to report them")
    args = parser.parse_args(argv)
    try:
        written = write_merged(args.results, args.out, args.preset)
    except (ValueError, OSError, KeyError) as err:
        print(f"merge_results: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print("\n".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`hayabusa bench --scenarios serve`: a `hayabusa serve` process under locust's streaming users, one record per
number of users with requests/s and TTFT / inter-token latency percentiles; and the load runner's own rules."""

import argparse
from dataclasses import replace

import pytest
import torch

from hayabusa.bench import report, suite
from hayabusa.bench.cli import add_arguments
from hayabusa.bench.records import DEFAULT_SCENARIOS, SCENARIOS
from hayabusa.bench.serve_load import LoadResult, percentile, run_load
from hayabusa.bench.serve_scenario import run_serve
from hayabusa.bench.workloads import SIZES
from hayabusa.engine.loading.config import PRESETS
from hayabusa.engine.loading.model_source import resolve_model_dir


def test_percentiles_are_measured_values() -> None:
    samples = [0.5, 0.1, 0.4, 0.2, 0.3]
    assert (percentile(samples, 50), percentile(samples, 99), percentile([7.0], 99)) == (0.3, 0.5, 7.0)
    result = LoadResult(users=2, run_time_s=10, completed=4, hung_up=1, errors={}, ttft_s=samples, itl_s=[0.01],
                        e2e_s=[1.0] * 4, completion_tokens=64, seconds=8.0)
    figures = result.summary()
    assert (figures["requests_per_s"], figures["tokens_per_s"], figures["ttft_p50_ms"]) == (0.5, 8.0, 300.0)


@pytest.mark.parametrize("url", ["http://10.0.0.5:8000", "http://example.com", "http://192.168.1.2:80"])
def test_load_goes_to_loopback_only(url) -> None:
    with pytest.raises(ValueError, match="loopback"):
        run_load(url, users=1, workload={}, run_time_s=1)


def test_serve_is_named_not_default() -> None:
    assert "serve" in SCENARIOS and "serve" not in DEFAULT_SCENARIOS
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "default: all but serve" in " ".join(parser.format_help().split())


def test_the_serve_scenario_measures_each_number_of_users() -> None:
    sizes = replace(SIZES["smoke"], serve_users=(1, 3), serve_seconds=1.5)
    settings = suite.SuiteSettings(model="tiny", model_dir=resolve_model_dir("tiny", None), preset="tiny",
                                   config=PRESETS["tiny"], device=torch.device("cpu"), dtype=torch.float32,
                                   sizes=sizes, scenarios=("serve",), engines=("hayabusa",), engines_requested=False)
    records = run_serve(settings)
    assert [(r.scenario, r.case, r.batch) for r in records] == [("serve", "users1", 1), ("serve", "users3", 3)]
    for record in records:
        extra = record.extra
        assert extra["completed"] > 0 and extra["errors"] == {} and extra["requests_per_s"] > 0
        assert record.tokens_per_s == pytest.approx(extra["completed"] * sizes.serve_gen_len / extra["seconds"])
        assert 0 < extra["ttft_p50_ms"] <= extra["ttft_p99_ms"] and 0 < extra["itl_p50_ms"] <= extra["itl_p99_ms"]
        assert (record.ms, record.ms_per_token) == (extra["ttft_p50_ms"], extra["itl_p50_ms"])
        assert (record.prompt_len, record.gen_len) == (sizes.serve_prompt_len, sizes.serve_gen_len)
    results = {"records": [r.as_dict() for r in records], "sizes": sizes.as_dict()}
    table = report._serve_table(report._records(results, "serve"))
    assert table[0].startswith("| engine | users | requests | requests / s") and len(table) == 4

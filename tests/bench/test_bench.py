"""The benchmark suite: roofline arithmetic, workloads, and `hayabusa bench` end to end on the tiny preset (CPU)."""


import json
from pathlib import Path

import pytest
import torch

from hayabusa.bench import cli, report, roofline, scenarios, suite
from hayabusa.bench.openvino_runner import openvino_missing
from hayabusa.bench.records import ENGINES, RECORD_KEYS, SCENARIOS, BenchRecord
from hayabusa.bench.runners import OPENVINO_ENGINES, BenchRunner, GenerateResult, make_runner, static_batches
from hayabusa.bench.timing import median
from hayabusa.bench.workloads import SIZES, check_sizes_fit, mixed_lengths, random_prompts
from hayabusa.engine.core.block_manager import BlockManager
from hayabusa.engine.loading.config import PRESETS
from hayabusa.engine.loading.model_source import resolve_model_dir

BIG = PRESETS["2.7b"]
DECODE_HEADER = ("| engine | weights | batch | prompt | ms / token | tokens / s | % of bandwidth floor "
                 "| weights GB / s | % of weight-read floor | vs eager | threads | others' CPUs |")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_decode_weight_bytes_of_the_27b_shape_in_fp16():
    weights = roofline.decode_weight_bytes(BIG, batch=1, bytes_per_param=2)
    assert 5.19e9 <= weights <= 5.4e9  # 5.20 GB
    # 32 layers x 12 h^2 matmul weights + the 32000 x 2560 LM head dominate; LayerNorms and biases are the rest.
    matmul_and_head = (32 * 12 * 2560**2 + 32000 * 2560) * 2
    assert 0 < weights - matmul_and_head < 2e6


def test_decode_step_bytes_add_the_kv_cache_read():
    kv_per_position = roofline.kv_bytes_per_position(BIG, 2)
    assert kv_per_position == 2 * 32 * 2560 * 2
    step = roofline.decode_step_bytes(BIG, [128], 2)
    # the new token attends 128 cached positions and itself, and its K/V are written once
    assert step == roofline.decode_weight_bytes(BIG, 1, 2) + kv_per_position * (128 + 1)
    assert 5.2e9 < step < 5.4e9
    batched = roofline.decode_step_bytes(BIG, [128] * 32, 2)
    assert batched - roofline.decode_weight_bytes(BIG, 32, 2) == 32 * kv_per_position * 129


def test_mean_decode_step_bytes_averages_the_growing_context():
    # steps 1..3 of a prompt-100 run attend 100, 101, 102 cached positions: the mean is the middle step
    mean = roofline.mean_decode_step_bytes(BIG, 4, prompt_len=100, gen_len=4, bytes_per_value=2)
    assert mean == roofline.decode_step_bytes(BIG, [101] * 4, 2)
    with pytest.raises(ValueError, match="gen_len"):
        roofline.mean_decode_step_bytes(BIG, 1, 100, 1, 2)


def test_decode_weight_bytes_equal_the_tied_model_parameter_count():
    from transformers import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM

    tiny = PRESETS["tiny"]
    with torch.device("meta"):  # shapes only
        model = GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(**tiny.to_hf_dict()))
    unique = {id(p): p.numel() for p in model.parameters()}
    # batch 0: the embedding rows a step looks up are not part of the stored parameters
    assert roofline.decode_weight_bytes(tiny, batch=0, bytes_per_param=1) == sum(unique.values())


def test_prefill_flops_by_hand():
    tiny = PRESETS["tiny"]  # hidden 160, 2 layers, vocab 32000
    h, t = 160, 10
    projections = 2 * t * 2 * (12 * h * h)
    attention = 2 * 2 * 2 * h * (t * (t + 1) // 2)
    lm_head = 2 * h * 32000
    assert roofline.prefill_flops(tiny, batch=1, prompt_len=t) == projections + attention + lm_head
    assert roofline.prefill_flops(tiny, batch=3, prompt_len=t) == 3 * (projections + attention) + 3 * lm_head
    # 2.7B at 2048 tokens: ~2 x 2.6e9 params x 2048 tokens, plus attention
    assert 1.0e13 < roofline.prefill_flops(BIG, 1, 2048) < 1.2e13


def test_floors_and_percentages():
    device = roofline.DeviceRoofline("cpu", "float16", copy_bytes_per_s=2e12, matmul_flops_per_s=5e14,
                                     copy_bytes=1, matmul_size=1)
    assert device.decode_floor_ms(5.2e9) == pytest.approx(2.6)
    assert device.prefill_floor_ms(1e12) == pytest.approx(2.0)
    assert roofline.pct_of_floor(2.6, 5.2) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="measured"):
        roofline.pct_of_floor(1.0, 0.0)


def test_measured_roofline_is_positive_and_finite():
    measured = roofline.measure_roofline(torch.device("cpu"), torch.float32, copy_bytes=1 << 20, matmul_size=64)
    assert 1e6 < measured.copy_bytes_per_s < 1e13
    assert 1e6 < measured.matmul_flops_per_s < 1e15
    assert measured.as_dict()["copy_gb_per_s"] == pytest.approx(measured.copy_bytes_per_s / 1e9)


def test_median():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    with pytest.raises(ValueError):
        median([])


def test_workloads_are_seeded_and_engine_independent():
    assert random_prompts([5, 3], seed=7) == random_prompts([5, 3], seed=7)
    assert random_prompts([5], seed=7) != random_prompts([5], seed=8)
    assert all(0 <= t < 31700 for p in random_prompts([50, 50], seed=1) for t in p)
    lengths = mixed_lengths(100, (4, 9), seed=3)
    assert min(lengths) >= 4 and max(lengths) <= 9 and len(set(lengths)) > 1


def test_cpu_sizes_fit_the_tiny_preset_and_full_sizes_fit_27b():
    check_sizes_fit(SIZES["cpu"], PRESETS["tiny"].max_position_embeddings)
    check_sizes_fit(SIZES["smoke"], PRESETS["tiny"].max_position_embeddings)
    check_sizes_fit(SIZES["full"], BIG.max_position_embeddings)
    with pytest.raises(ValueError, match="max_position_embeddings 64"):
        check_sizes_fit(SIZES["cpu"], 64)


class FakeRunner(BenchRunner):
    """Records what it was asked to generate; its decode takes 3 ms per step after the first token."""

    name = "hayabusa-reference"

    def __init__(self) -> None:
        super().__init__(Path("."), torch.float16, torch.device("cpu"))
        self.calls: list[tuple[list[list[int]], list[int]]] = []

    def load(self) -> None:
        pass

    def unload(self) -> None:
        pass

    def generate(self, prompts, gen_lens):
        self.calls.append((prompts, gen_lens))
        return GenerateResult(sum(gen_lens), decode_s=0.003 * (max(gen_lens) - 1))


def test_decode_figure_is_the_time_per_step_after_the_first_token_against_the_bandwidth_floor():
    runner = FakeRunner()
    sizes = SIZES["smoke"]  # prompt 16, 4 tokens
    device = roofline.DeviceRoofline("cpu", "float16", 1e9, 1e12, 1, 1)
    record = scenarios.run_decode(runner, sizes, PRESETS["tiny"], device, batch=4)
    assert record.ms_per_token == pytest.approx(3.0)
    assert record.tokens_per_s == pytest.approx(4 * 1000 / 3.0)
    floor = device.decode_floor_ms(roofline.mean_decode_step_bytes(PRESETS["tiny"], 4, 16, 4, 2))
    assert record.pct_roofline == pytest.approx(100 * floor / 3.0)
    assert len(record.samples_ms) == sizes.repeats and len(runner.calls) == sizes.warmup + sizes.repeats
    # every call got 4 prompts of 16 tokens and asked for exactly 4 tokens each
    assert {len(p) for prompts, _ in runner.calls for p in prompts} == {16}
    assert {tuple(g) for _, g in runner.calls} == {(4,) * 4}
    # prompts of its own (a repeated one would be a prefix-cache hit), the same ones for every engine
    assert len({tuple(p[:16]) for prompts, _ in runner.calls for p in prompts}) == 4 * len(runner.calls)
    other = FakeRunner()
    scenarios.run_decode(other, sizes, PRESETS["tiny"], device, batch=4)
    assert other.calls == runner.calls


def test_static_batches_cover_every_request_once():
    assert static_batches(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert static_batches(3, None) == [slice(0, 3)]


def test_cli_rejects_bad_options_without_a_traceback(capsys, tmp_path):
    assert cli.main(["--model", "tiny", "--out", str(tmp_path), "--scenarios", "decode,warp"]) == 1
    assert capsys.readouterr().err.startswith("hayabusa bench: error: --scenarios: unknown 'warp'")
    assert cli.main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--device", "cpu"]) == 1
    assert "nowhere" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["--model", "tiny", "--out", str(tmp_path), "--device", "cuda"]) == 1
        assert capsys.readouterr().err.startswith("hayabusa bench: error: device 'cuda': ")


def _synthetic_results(records):
    return {"created": "2026-01-01T00:00:00+00:00", "device": "test device", "driver": None, "commit": "abc",
            "dtype": "float16", "versions": {"torch": "x", "triton": "y", "transformers": "z"},
            "model": {"source": "2.7b", "preset": "2.7b", "random_weights": True},
            "sizes": dict(SIZES["smoke"].as_dict()),
            "roofline": {"copy_gb_per_s": 3000.0, "matmul_tflops": 700.0, "dtype": "float16", "matmul_size": 8192},
            "skipped": [{"engine": "transformers-compile", "scenario": "all", "reason": "because"}],
            "errors": [], "records": records}


def _decode_record(engine, batch, ms_per_token):
    return BenchRecord(engine, "decode", f"batch{batch}", batch, 128, 128, ms_per_token, 100.0,
                       batch * 1e3 / ms_per_token, 50.0, "bandwidth", 1, [100.0], None).as_dict()


def test_markdown_table_compares_each_engine_with_transformers_eager(tmp_path):
    results = _synthetic_results([_decode_record("transformers-eager", 1, 20.0), _decode_record("hayabusa", 1, 4.0),
                                  _decode_record("hayabusa", 8, 5.0)])
    text = report.markdown_report(results)
    assert DECODE_HEADER in text
    assert "| hayabusa | – | 1 | 128 | 4.00 | 250.0 | 50.0 | – | – | 5.00x | – | – |" in text
    assert "| transformers-eager | – | 1 | 128 | 20.00 | 50.0 | 50.0 | – | – | 1.00x | – | – |" in text
    assert "| hayabusa | – | 8 | 128 | 5.00 | 1,600 | 50.0 | – | – | – | – | – |" in text  # no baseline at batch 8
    assert "`transformers-compile` (all): because" in text
    report.write_plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(PNG_MAGIC)


def recording_prefix_hits(patch: pytest.MonkeyPatch) -> list[int]:
    """The prefix-cache hit (tokens) of every sequence the paged engine allocates from now on."""
    hits: list[int] = []
    allocate = BlockManager.allocate

    def recording_allocate(self, seq, max_cached_tokens=None):
        allocate(self, seq, max_cached_tokens)
        hits.append(seq.num_cached_tokens)

    patch.setattr(BlockManager, "allocate", recording_allocate)
    return hits


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """`hayabusa bench` on the tiny preset, CPU, smoke sizes, default engines (a preset checkpoint written fresh);
    (exit status, output directory, prefix-cache hits of every sequence hayabusa's engine ran)."""
    out = tmp_path_factory.mktemp("bench-out")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HAYABUSA_CACHE", str(tmp_path_factory.mktemp("cache")))
        hits = recording_prefix_hits(patch)
        rc = cli.main(["--model", "tiny", "--out", str(out), "--device", "cpu", "--sizes", "smoke"])
    return rc, out, hits


def test_cpu_run_writes_the_json_schema(cpu_run):
    rc, out, _ = cpu_run
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["errors"] == [] and rc == 0
    assert results["device_type"] == "cpu" and results["device"]
    assert (results["commit"] is None or len(results["commit"]) >= 40) and results["commit_source"]
    assert results["versions"]["torch"] == torch.__version__ and "triton" in results["versions"]
    assert results["model"]["preset"] == "tiny" and results["sizes"]["name"] == "smoke"
    assert results["roofline"]["copy_gb_per_s"] > 0 and results["roofline"]["matmul_tflops"] > 0
    # the machine's load around the run and before every case, and the torch threads each case ran with
    assert {"start", "end"} <= set(results["machine_load"]) and results["machine_load"]["start"]["cpus"] >= 1
    assert isinstance(results["warnings"], list) and results["torch_threads"] >= 1
    for record in results["records"]:
        if record["scenario"] != "tokenizer":
            assert record["extra"]["torch_threads"] >= 1 and "loadavg_1m" in record["extra"]["machine_load"]
    # whatever hayabusa chose for itself, transformers ran with the run's own thread count
    threads = {r["engine"]: r["extra"]["torch_threads"] for r in results["records"] if r["scenario"] == "decode"}
    for record in (r for r in results["records"] if r["scenario"] == "decode"):  # the weights' share of bandwidth
        extra = record["extra"]
        assert extra["pct_copy_bandwidth_weights"] == pytest.approx(
            100 * extra["weight_gb_per_s"] / results["roofline"]["copy_gb_per_s"])
        assert extra["pct_read_bandwidth_weights"] == pytest.approx(
            100 * extra["weight_gb_per_s"] / results["roofline"]["read_gb_per_s"])
        assert extra["weight_format"] == {"float32": "fp32", "bfloat16": "bf16"}[results["dtype"]]
    assert threads["transformers-eager"] == results["torch_threads"]
    assert results["decode_kernels"] == []  # CUDA only
    launches = results["launches_per_decode_step"]  # counted with an H200's configs on a CPU
    assert launches["num_sms"] == 132 and [c["batch"] for c in launches["by_batch"]] == [1, 4]
    assert [c["per_layer"] for c in launches["by_batch"]] == [5, 5]
    # on a CPU the Triton engine and torch.compile are skipped by default, each with its reason, and OpenVINO where
    # optimum-intel is not installed; prompt-lookup acceptance is measured on hayabusa's engine only
    skipped_engines = {"hayabusa", "transformers-compile"} | (set(OPENVINO_ENGINES) if openvino_missing() else set())
    assert {s["engine"] for s in results["skipped"] if s["scenario"] == "all"} == skipped_engines
    assert [s["engine"] for s in results["skipped"] if s["scenario"] == "speculation"] == ["transformers-eager"]
    assert all(s["reason"] for s in results["skipped"])
    (speculation,) = [r for r in results["records"] if r["scenario"] == "speculation"]
    assert speculation["engine"] == "hayabusa-reference" and speculation["gen_len"] == SIZES["smoke"].decode_gen_len
    extra = speculation["extra"]
    assert 0 <= extra["accepted_tokens"] <= extra["draft_tokens"] and 0 <= extra["acceptance_rate"] <= 1
    assert extra["tokens_per_forward_pass"] == speculation["gen_len"] / (speculation["gen_len"]
                                                                         - extra["accepted_tokens"])
    records = results["records"]
    for record in records:
        assert set(RECORD_KEYS) <= set(record), record
        assert record["engine"] in ENGINES and record["scenario"] in SCENARIOS
        assert len(record["samples_ms"]) == record["repeats"] and all(t > 0 for t in record["samples_ms"])
    for engine in ("hayabusa-reference", "transformers-eager"):
        mine = [r for r in records if r["engine"] == engine]
        decode = sorted((r for r in mine if r["scenario"] == "decode"), key=lambda r: r["batch"])
        assert [r["batch"] for r in decode] == list(SIZES["smoke"].decode_batches)
        for r in decode:
            assert r["prompt_len"] == SIZES["smoke"].decode_prompt_len and r["gen_len"] == SIZES["smoke"].decode_gen_len
            assert r["ms_per_token"] > 0 and r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["ms_per_token"])
            # a fraction of measured ceilings: positive and finite; its size is a timing, not a pass/fail
            assert 0 < r["pct_roofline"] < float("inf") and r["roofline_basis"] == "bandwidth"
        prefill = [r for r in mine if r["scenario"] == "prefill"]
        assert [r["prompt_len"] for r in prefill] == list(SIZES["smoke"].prefill_prompt_lens)
        assert all(r["ms"] > 0 and 0 < r["pct_roofline"] < float("inf") for r in prefill)
        throughput = {r["case"]: r for r in mine if r["scenario"] == "throughput"}
        assert set(throughput) == {"uniform", "mixed"}
        assert all(r["batch"] == SIZES["smoke"].throughput_requests and r["tokens_per_s"] > 0
                   for r in throughput.values())
        assert [r["ms"] > 0 for r in mine if r["scenario"] == "load"] == [True]
    tokenizer = {(r["engine"], r["case"]): r for r in records if r["scenario"] == "tokenizer"}
    assert set(tokenizer) == {(e, c) for e in ("hayabusa", "transformers-eager") for c in ("encode", "decode")}
    # both tokenizers split the same text into the same number of tokens
    encoded = tokenizer["hayabusa", "encode"], tokenizer["transformers-eager", "encode"]
    assert encoded[0]["extra"]["tokens"] == encoded[1]["extra"]["tokens"]


def test_no_prompt_of_the_cpu_run_was_a_prefix_cache_hit(cpu_run):
    """A repeated prompt would skip its prefill in hayabusa's engine (and not in transformers'): the prefill figure
    would time less work than it counts (it read 148% and 301% of the matmul peak)."""
    *_, hits = cpu_run
    assert len(hits) > 20 and set(hits) == {0}


def test_a_repeated_prompt_is_a_prefix_cache_hit(monkeypatch):
    """What the probe above would see if the bench timed one prompt twice."""
    hits = recording_prefix_hits(monkeypatch)
    runner = make_runner("hayabusa-reference", resolve_model_dir("tiny", None), torch.float32, torch.device("cpu"),
                         static_batch=1, explicitly_requested=False)
    runner.load()
    prompts = random_prompts([40], seed=0)
    runner.generate(prompts, [1])
    runner.generate(prompts, [1])
    runner.unload()
    assert hits == [0, 32]  # the second time, both full blocks of 16 tokens came from the cache


def test_transformers_runner_does_not_stop_at_eos(cpu_run):
    _, out, _ = cpu_run
    model_dir = Path(json.loads((out / "results.json").read_text(encoding="utf-8"))["model"]["dir"])
    runner = make_runner("transformers-eager", model_dir, torch.float32, torch.device("cpu"), static_batch=2,
                         explicitly_requested=False)
    runner.load()

    def always_eos(input_ids, scores):
        scores[:, PRESETS["tiny"].eos_token_id] = 1e9
        return scores

    prompt = torch.tensor(random_prompts([8], seed=0))
    ids = runner.model.generate(input_ids=prompt, generation_config=runner._generation_config(5),
                                logits_processor=[always_eos])
    assert ids[0, 8:].tolist() == [PRESETS["tiny"].eos_token_id] * 5


def test_cpu_run_writes_the_markdown_table_and_the_png(cpu_run):
    _, out, _ = cpu_run
    text = (out / "results.md").read_text(encoding="utf-8")
    assert DECODE_HEADER in text
    for engine in ("hayabusa-reference", "transformers-eager"):
        assert text.count(f"| {engine} | ") >= len(SIZES["smoke"].decode_batches)
    assert "## Prefill" in text and "## Offline throughput" in text and "## Tokenizer" in text
    assert "`hayabusa` (all):" in text
    assert "- **Machine**: " in text and "torch threads" in text
    assert "## Issue 9's GPU targets (set for one H200) (not evaluated: no GPU in this run; never claimed)" in text
    png = (out / "results.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_a_failing_engine_is_recorded_and_the_others_still_run(monkeypatch):
    class BrokenRunner(FakeRunner):
        def generate(self, prompts, gen_lens):
            raise RuntimeError("kernel exploded")

    runners = {"hayabusa-reference": BrokenRunner(), "transformers-eager": FakeRunner()}
    runners["transformers-eager"].name = "transformers-eager"
    monkeypatch.setattr(suite, "make_runner", lambda name, *args: runners[name])
    settings = suite.SuiteSettings(
        model="tiny", model_dir=Path("."), preset="tiny", config=PRESETS["tiny"], device=torch.device("cpu"),
        dtype=torch.float32, sizes=SIZES["smoke"], scenarios=("decode",), engines=tuple(runners),
        engines_requested=True)
    result = suite.run_suite(settings)
    assert [(e["engine"], e["scenario"]) for e in result.errors] == [("hayabusa-reference", "decode")] * 2
    assert "kernel exploded" in result.errors[0]["error"]
    assert [(r.engine, r.batch) for r in result.records] == [("transformers-eager", 1), ("transformers-eager", 4)]


def test_start_time_times_one_engine_start_and_prints_it(capsys):
    from hayabusa.bench import start_time

    start_time.main(["--model", "tiny", "--dtype", "float32", "--device", "cpu", "--backend", "reference"])
    assert json.loads(capsys.readouterr().out)["ms"] > 0


def test_load_reports_cold_and_warm_starts_of_engines_that_compile():
    class Compiling(FakeRunner):
        def start_times(self):
            return 9000.0, 1200.0

    record = scenarios.run_load(Compiling(), SIZES["smoke"])
    assert (record.extra["cold_start_ms"], record.extra["warm_start_ms"]) == (9000.0, 1200.0)
    assert "cold_start_ms" not in scenarios.run_load(FakeRunner(), SIZES["smoke"]).extra

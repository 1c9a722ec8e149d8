"""Prometheus metrics of one server (one registry per app, so several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from hayabusa.engine.core.paged_engine import PagedEngine, RequestUpdate

# Seconds: a 2.7B decode step is ~2-10 ms on a GPU and ~100 ms+ on a CPU; prefill of a long prompt ~1 s.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """Counters and histograms fed by the engine loop (as its LoopObserver) and the error path; gauges read the
    engine's stats() when scraped."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: PagedEngine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hayabusa_requests", "Engine requests (each completion of one) that ended, by finish "
                                "reason (stop, length, abort: the client went away, error)", ["finish_reason"],
                                registry=r)
        self.rejected = Counter("hayabusa_rejected_requests", "API calls answered with an error status, by status",
                                ["status"], registry=r)
        self.prompt_tokens = Counter("hayabusa_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("hayabusa_generation_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram("hayabusa_time_to_first_token_seconds",
                                             "From the request's arrival to its first token",
                                             buckets=TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram("hayabusa_inter_token_latency_seconds",
                                     "Between two consecutive tokens of a request", buckets=INTER_TOKEN_BUCKETS,
                                     registry=r)
        self.request_latency = Histogram("hayabusa_e2e_request_latency_seconds",
                                         "From the request's arrival to its last token", buckets=LATENCY_BUCKETS,
                                         registry=r)
        Gauge("hayabusa_num_requests_running", "Requests holding KV blocks and decoding",
              registry=r).set_function(lambda: engine.stats().num_running)
        Gauge("hayabusa_num_requests_waiting", "Requests queued for prefill (new or preempted)",
              registry=r).set_function(lambda: engine.stats().num_waiting)
        Gauge("hayabusa_kv_cache_blocks_in_use", "KV-cache blocks held by requests (a free block may still "
              "hold a cached prefix)", registry=r).set_function(lambda: _blocks_in_use(engine))
        Gauge("hayabusa_kv_cache_blocks_total", "KV-cache blocks in the pool",
              registry=r).set_function(lambda: engine.stats().num_blocks)

    # LoopObserver
    def on_update(self, update: RequestUpdate, created: float, last_token_at: float | None, now: float) -> None:
        if update.new_token_ids:
            self.generation_tokens.inc(len(update.new_token_ids))
            if last_token_at is None:
                self.time_to_first_token.observe(now - created)
            else:
                self.inter_token.observe(now - last_token_at)
        if update.finished is not None:
            self.requests.labels(update.finished.finish_reason).inc()
            if update.index == 0:  # a prompt's completions share it
                self.prompt_tokens.inc(len(update.finished.prompt_token_ids))
            self.request_latency.observe(now - created)

    def on_closed(self, finish_reason: str, num_requests: int) -> None:
        self.requests.labels(finish_reason).inc(num_requests)

    def on_rejected(self, status: int) -> None:
        self.rejected.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _blocks_in_use(engine: PagedEngine) -> int:
    stats = engine.stats()
    return stats.num_blocks - stats.num_free_blocks

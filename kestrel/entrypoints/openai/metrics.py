"""Prometheus metrics for GET /metrics, fed by the AsyncEngine's observer hooks.

Owns the metric names and buckets. Each server gets its own registry, so several servers
can live in one process (tests). Must not compute anything the engine already reports.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kestrel.engine.async_engine import EngineObserver

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics(EngineObserver):
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, list(labels), registry=reg).labels(**labels)

        self._requests = Counter("kestrel_requests", "Finished requests by finish reason "
                                 "(stop, length, abort, error)",
                                 [*labels, "finish_reason"], registry=reg)
        self._labels = labels
        self.ttft = Histogram("kestrel_time_to_first_token_seconds",
                              "Time from arrival to the first generated token", list(labels),
                              buckets=_LATENCY_BUCKETS, registry=reg).labels(**labels)
        self.itl = Histogram("kestrel_inter_token_latency_seconds",
                             "Time between consecutive outputs of a request", list(labels),
                             buckets=_LATENCY_BUCKETS, registry=reg).labels(**labels)
        self.e2e = Histogram("kestrel_e2e_request_latency_seconds",
                             "Time from arrival to finish", list(labels), buckets=_E2E_BUCKETS,
                             registry=reg).labels(**labels)
        self.generation_tokens = Counter("kestrel_generation_tokens", "Generated tokens",
                                         list(labels), registry=reg).labels(**labels)
        self.prompt_tokens = Counter("kestrel_prompt_tokens", "Prompt tokens of finished "
                                     "requests", list(labels), registry=reg).labels(**labels)
        self.running = gauge("kestrel_num_requests_running", "Sequences being computed")
        self.waiting = gauge("kestrel_num_requests_waiting", "Sequences waiting for a slot")
        self.kv_usage = gauge("kestrel_kv_cache_usage_ratio",
                              "Fraction of KV blocks held by requests (0-1)")
        self.kv_free = gauge("kestrel_kv_cache_free_blocks", "KV blocks free or evictable")
        self.kv_total = gauge("kestrel_kv_cache_blocks", "KV blocks in total")
        self.hit_rate = gauge("kestrel_prefix_cache_hit_rate",
                              "Prefix-cache hits / queries, in tokens (0-1)")
        self.preemptions = gauge("kestrel_num_preemptions", "Preemptions since start")

    # EngineObserver hooks (engine thread)
    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_tokens(self, num_tokens: int, itl_s: float | None) -> None:
        self.generation_tokens.inc(num_tokens)
        if itl_s is not None:
            self.itl.observe(itl_s)

    def on_finish(self, finish_reason: str, e2e_s: float, num_prompt_tokens: int,
                  num_generated_tokens: int) -> None:
        self._requests.labels(**self._labels, finish_reason=finish_reason).inc()
        self.e2e.observe(e2e_s)
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_stats(self, stats: dict[str, float]) -> None:
        self.running.set(stats["num_running"])
        self.waiting.set(stats["num_waiting"])
        self.kv_usage.set(stats["kv_cache_usage"])
        self.kv_free.set(stats["num_free_blocks"])
        self.kv_total.set(stats["num_blocks"])
        self.hit_rate.set(stats["prefix_cache_hit_rate"])
        self.preemptions.set(stats.get("num_preemptions", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)

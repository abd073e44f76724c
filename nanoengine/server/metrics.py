"""``GET /metrics``: the engine's state and the requests' latencies, for Prometheus.

Names start ``nanoengine:`` and otherwise match vLLM's, so a vLLM dashboard works with
the prefix changed. Two kinds of numbers:

* the engine's state (running and waiting requests, KV usage, prefix-cache and preemption
  counts) lives in the engine process; it is read from ``engine.metrics()`` at scrape time
  by a custom collector, so the page is never staler than the engine's last step;
* per-request numbers (tokens, finish reasons, TTFT, TPOT, end-to-end latency) are
  recorded here as each request finishes, from its ``RequestOutput.metrics``.

Each app has its own ``CollectorRegistry``: no global state, so two apps (or tests) in one
process never share or clash over metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from nanoengine.engine.async_engine import EngineMetrics
from nanoengine.outputs import RequestOutput

# vLLM's buckets (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)


class _EngineCollector:
    """Mirrors the engine's latest snapshot into gauges and counters at every scrape."""

    def __init__(self, snapshot: Callable[[], EngineMetrics], block_size: int, model_name: str) -> None:
        self.snapshot = snapshot
        self.block_size = block_size
        self.model_name = model_name

    def describe(self) -> list[Metric]:
        return []  # collected lazily: the registry must not call the engine at registration

    def collect(self) -> Iterator[Metric]:
        m = self.snapshot()
        labels, values = ["model_name"], [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"nanoengine:{name}", doc, labels=labels)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"nanoengine:{name}", doc, labels=labels)
            family.add_metric(values, value)
            return family

        yield gauge("num_requests_running", "Requests in the running batch.", m.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", m.num_waiting)
        usage = m.num_used_blocks / m.num_blocks if m.num_blocks else 0.0
        yield gauge("kv_cache_usage_perc", "Fraction of KV blocks held by requests (1 = full).", usage)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      m.prefix_cache_queried_blocks * self.block_size)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      m.prefix_cache_hit_blocks * self.block_size)
        yield counter("num_preemptions", "Requests preempted to free KV blocks.", m.num_preemptions)
        yield counter("spec_decode_num_drafts", "Verifications of speculated tokens (lesson 10).",
                      m.spec_decode_num_drafts)
        yield counter("spec_decode_num_draft_tokens", "Speculated tokens proposed.", m.spec_decode_num_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Speculated tokens accepted.",
                      m.spec_decode_num_accepted_tokens)
        drafts = m.spec_decode_num_drafts
        yield gauge("spec_decode_mean_acceptance_length",
                    "Tokens per verification: accepted guesses plus the target's own (1 = no gain).",
                    1 + m.spec_decode_num_accepted_tokens / drafts if drafts else 1.0)


class ServerMetrics:
    """The app's registry: the engine collector plus the per-request series."""

    def __init__(self, snapshot: Callable[[], EngineMetrics], block_size: int, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(snapshot, block_size, model_name))
        self.model_name = model_name
        r, label = self.registry, ["model_name"]
        self.prompt_tokens = Counter("nanoengine:prompt_tokens", "Prompt tokens processed.", label, registry=r)
        self.generation_tokens = Counter("nanoengine:generation_tokens", "Tokens generated.", label, registry=r)
        self.request_success = Counter("nanoengine:request_success", "Finished sequences, by finish reason.",
                                       ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("nanoengine:time_to_first_token_seconds", "Time to first token.", label,
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("nanoengine:time_per_output_token_seconds", "Time per output token after the first.",
                              label, buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("nanoengine:e2e_request_latency_seconds", "Arrival to last token.", label,
                             buckets=E2E_BUCKETS, registry=r)

    def observe_finished(self, output: RequestOutput) -> None:
        """Record a finished request (each of its ``n`` sequences counts under its finish reason)."""
        name = self.model_name
        num_generated = sum(len(c.token_ids) for c in output.outputs)
        self.prompt_tokens.labels(name).inc(len(output.prompt_token_ids))
        self.generation_tokens.labels(name).inc(num_generated)
        for completion in output.outputs:
            self.request_success.labels(name, completion.finish_reason or "abort").inc()
        times = output.metrics
        if times is None:
            return
        if times.first_token_time is not None:
            self.ttft.labels(name).observe(max(0.0, times.first_token_time - times.arrival_time))
            longest = max((len(c.token_ids) for c in output.outputs), default=0)
            if times.finished_time is not None and longest > 1:
                self.tpot.labels(name).observe(max(0.0, times.finished_time - times.first_token_time) / (longest - 1))
        if times.finished_time is not None:
            self.e2e.labels(name).observe(max(0.0, times.finished_time - times.arrival_time))

    def observe_embedded(self, num_prompt_tokens: int) -> None:
        """Record an embedding request (lesson 16): its prompt tokens; it generates none."""
        self.prompt_tokens.labels(self.model_name).inc(num_prompt_tokens)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

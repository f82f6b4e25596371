"""/metrics in Prometheus' text format, read at scrape time from the scheduler's counts and its copy of the model's
stats (the model belongs to the worker thread: a scrape never touches it, nor syncs its GPU)."""

from __future__ import annotations

from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .scheduler import TOKENS_PER_S_WINDOW_S


class ServerCollector:
    def __init__(self, scheduler):
        self.scheduler = scheduler

    def collect(self):
        s, m = self.scheduler.stats, self.scheduler.model_stats
        yield GaugeMetricFamily("flashmoe_queue_depth", "Requests waiting for a turn", value=s.waiting)
        yield GaugeMetricFamily("flashmoe_active_requests", "Requests generating now", value=s.active)
        yield GaugeMetricFamily("flashmoe_generation_tokens_per_second",
                                f"Tokens generated per second, averaged over the last {TOKENS_PER_S_WINDOW_S:.0f} s",
                                value=s.tokens_per_s)
        yield CounterMetricFamily("flashmoe_generated_tokens", "Tokens generated", value=s.generated_tokens)
        yield CounterMetricFamily("flashmoe_prompt_tokens", "Prompt tokens processed", value=s.prompt_tokens)
        requests = CounterMetricFamily("flashmoe_requests", "Requests ended, by outcome", labels=["outcome"])
        requests.add_metric(["finished"], s.requests_finished)
        requests.add_metric(["cancelled"], s.requests_cancelled)
        requests.add_metric(["failed"], s.requests_failed)
        yield requests
        hit_rate = GaugeMetricFamily("flashmoe_expert_cache_hit_rate", "Expert cache hit rate, by tier",
                                     labels=["tier"])
        hit_rate.add_metric(["ram"], m["cache_hit_rate"])
        if "vram_cache_hit_rate" in m:
            hit_rate.add_metric(["vram"], m["vram_cache_hit_rate"])
        yield hit_rate
        yield CounterMetricFamily("flashmoe_expert_bytes_read", "Expert bytes read from the store",
                                  value=m["expert_bytes_read"])
        if "prefix_hits" in m:  # serve --prefix-cache-gb
            lookups = CounterMetricFamily("flashmoe_prefix_cache_lookups", "Prompts looked up in the prefix cache, "
                                          "by result", labels=["result"])
            lookups.add_metric(["hit"], m["prefix_hits"])
            lookups.add_metric(["miss"], m["prefix_misses"])
            yield lookups
            yield CounterMetricFamily("flashmoe_prefix_cache_tokens_saved", "Prompt tokens not prefilled: a kept state "
                                      "held them", value=m["prefix_tokens_saved"])
            yield GaugeMetricFamily("flashmoe_prefix_cache_bytes", "Bytes of kept sequence states",
                                    value=m["prefix_bytes"])


def metrics_response(scheduler) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(scheduler))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

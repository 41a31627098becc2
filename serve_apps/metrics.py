"""The app's Prometheus metrics, through ``ray.serve.metrics`` (exported on Ray's metrics endpoint).

Names follow Prometheus conventions: a ``deepomni_`` prefix, base units (``_seconds``), and counters
registered without ``_total`` because the exporter appends it. Ray prefixes every application metric with
``ray_``, and Serve adds the tags ``deployment``, ``replica`` and ``application``. So the counter
registered as ``deepomni_rejected_requests`` is scraped as ``ray_deepomni_rejected_requests_total``;
:func:`exported_names` lists the scraped names (dashboards and their tests use them).

Metric objects are made inside a replica (:func:`ingress_metrics`, :func:`backbone_metrics`): Serve
can tag them only there.
"""

from __future__ import annotations

from deepomni.metrics import MetricSpec, scraped_names

# seconds: time to first audio spans ~10 ms (tiny, CPU) to a few s (large models under load)
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)


METRICS = (
    MetricSpec("deepomni_time_to_first_audio_seconds", "histogram",
               "Request received (body read) to the first answer audio chunk sent, per answer."),
    MetricSpec("deepomni_audio_chunk_gap_seconds", "histogram",
               "Time between consecutive answer audio chunks sent to a client."),
    MetricSpec("deepomni_real_time_factor", "histogram",
               "Answer generation wall time divided by the duration of the answer audio (below 1: faster "
               "than real time)."),
    MetricSpec("deepomni_active_sessions", "gauge",
               "Sessions decoding in a Backbone replica's batch (queued ones excluded).", ("state",)),
    MetricSpec("deepomni_generated_tokens", "counter",
               "Tokens generated, by channel kind: text (text channel) or speech (codec tokens, K per frame).",
               ("channel",)),
    MetricSpec("deepomni_expert_routed_tokens", "counter",
               "Tokens routed to each expert of each MoE layer, by modality (speech = AUDIO prompt positions "
               "and speech-item rows; text = the rest).", ("layer", "expert", "modality")),
    MetricSpec("deepomni_rejected_requests", "counter",
               "Requests or WebSocket turns refused, by reason (docs/serving.md 'Errors').", ("reason", "endpoint")),
    MetricSpec("deepomni_cancelled_sessions", "counter",
               "Answers stopped before their end because the client went away or cancelled.", ("reason",)),
)
METRIC_NAMES = tuple(m.name for m in METRICS)


def exported_names() -> tuple[str, ...]:
    """The names Prometheus scrapes (``ray_`` prefix; ``_total`` on counters; histograms also expose
    ``_bucket``/``_sum``/``_count`` series under the same base name)."""
    return scraped_names(METRICS)


def _make(spec: MetricSpec):
    from ray.serve import metrics

    if spec.kind == "counter":
        return metrics.Counter(spec.name, spec.description, tag_keys=spec.tag_keys or None)
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, spec.description, tag_keys=spec.tag_keys or None)
    buckets = RTF_BUCKETS if spec.name == "deepomni_real_time_factor" else LATENCY_BUCKETS_S
    return metrics.Histogram(spec.name, spec.description, boundaries=list(buckets), tag_keys=spec.tag_keys or None)


class Metrics:
    """The metric objects one replica records, by attribute: ``m.rejected_requests.inc(tags=...)``."""

    def __init__(self, names: tuple[str, ...] = METRIC_NAMES):
        for spec in METRICS:
            if spec.name in names:
                setattr(self, spec.name.removeprefix("deepomni_"), _make(spec))


def ingress_metrics() -> Metrics:
    return Metrics(("deepomni_time_to_first_audio_seconds", "deepomni_audio_chunk_gap_seconds",
                    "deepomni_real_time_factor", "deepomni_rejected_requests"))


def backbone_metrics() -> Metrics:
    return Metrics(("deepomni_active_sessions", "deepomni_generated_tokens", "deepomni_expert_routed_tokens",
                    "deepomni_cancelled_sessions"))

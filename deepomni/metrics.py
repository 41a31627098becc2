"""Prometheus metrics of the Ray jobs, through ``ray.util.metrics`` (exported on Ray's metrics endpoint).

Each component lists its metrics once, as a ``METRICS`` tuple of :class:`MetricSpec` (the Serve app in
``serve_apps/metrics.py``, training in ``deepomni/train/metrics.py``, data preparation in
``deepomni/data/metrics.py``); the metric objects, the scraped names (:func:`scraped_names`, what
dashboards, rules and their tests use) and ``docs/monitoring.md`` follow from it.

Naming: a ``deepomni_`` prefix, base units (``_seconds``), counters registered without ``_total``. Ray
prefixes every application metric with ``ray_`` and its exporter appends ``_total`` to counters, so the
counter ``deepomni_data_rows`` is scraped as ``ray_deepomni_data_rows_total``; histograms add
``_bucket`` / ``_sum`` / ``_count`` series under their name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as registered with ray.util.metrics / ray.serve.metrics
    kind: str  # "counter" | "gauge" | "histogram"
    description: str
    tag_keys: tuple[str, ...] = ()


def scraped_names(specs: Iterable[MetricSpec]) -> tuple[str, ...]:
    """The names Prometheus scrapes for ``specs`` (``ray_`` prefix, ``_total`` on counters)."""
    return tuple(f"ray_{m.name}_total" if m.kind == "counter" else f"ray_{m.name}" for m in specs)


class _Off:
    """Stands in for a metric outside Ray (a stage called directly, a unit test): records nothing."""

    def inc(self, *a, **k) -> None: ...

    def set(self, *a, **k) -> None: ...

    def observe(self, *a, **k) -> None: ...


def make_metric(spec: MetricSpec, default_tags: dict[str, str] | None = None, boundaries=None):
    """The ``ray.util.metrics`` object for ``spec`` (a no-op one when this process is not connected to
    Ray). ``default_tags`` fill those of its tag keys that every record shares (run, stage, rank)."""
    import ray

    if not ray.is_initialized():
        return _Off()
    from ray.util import metrics

    tags = spec.tag_keys or None
    if spec.kind == "counter":
        m = metrics.Counter(spec.name, spec.description, tag_keys=tags)
    elif spec.kind == "gauge":
        m = metrics.Gauge(spec.name, spec.description, tag_keys=tags)
    else:
        m = metrics.Histogram(spec.name, spec.description, boundaries=list(boundaries), tag_keys=tags)
    if default_tags:
        m.set_default_tags({k: v for k, v in default_tags.items() if k in spec.tag_keys})
    return m

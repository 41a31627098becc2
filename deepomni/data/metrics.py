"""Data-preparation metrics (Prometheus, through ``ray.util.metrics``): what the Ray Data map stages of
``deepomni/data/pipeline.py`` process, counted inside their actors, one batch at a time.

Tag ``stage``: ``feature`` (spoken questions -> log-mel), ``codec`` (spoken answers -> codec codes),
``sequence`` (chat template, channel packing). A rejected row is counted once, by the stage that rejected
it, with ``reason`` = the part that failed, the prefix of the row's ``error`` column in the
``status=rejected`` shards: ``question_audio``, ``answer_audio`` or ``sequence``. Scraped names:
:func:`exported_names`; ``docs/monitoring.md`` lists them.
"""

from __future__ import annotations

from ..metrics import MetricSpec, make_metric, scraped_names

STAGES = ("feature", "codec", "sequence")

METRICS = (
    MetricSpec("deepomni_data_rows", "counter", "Rows a preparation stage processed (rejected ones included).",
               ("stage",)),
    MetricSpec("deepomni_data_rejected_rows", "counter",
               "Rows a stage rejected (kept, written under status=rejected with the reason), by reason.",
               ("stage", "reason")),
    MetricSpec("deepomni_data_audio_seconds", "counter",
               "Seconds of audio decoded: spoken questions (stage feature), spoken answers (stage codec).",
               ("stage",)),
)
METRIC_NAMES = tuple(m.name for m in METRICS)


def exported_names() -> tuple[str, ...]:
    """The names Prometheus scrapes."""
    return scraped_names(METRICS)


class StageMetrics:
    """The counters of one stage's actor; :meth:`batch` records one batch."""

    def __init__(self, stage: str):
        m = {s.name: make_metric(s, {"stage": stage}) for s in METRICS}
        self.rows, self.rejected = m["deepomni_data_rows"], m["deepomni_data_rejected_rows"]
        self.audio = m["deepomni_data_audio_seconds"]

    def batch(self, rows: int, rejected: int = 0, reason: str = "", audio_seconds: float = 0.0) -> None:
        if rows:
            self.rows.inc(rows)
        if rejected:
            self.rejected.inc(rejected, tags={"reason": reason})
        if audio_seconds > 0:
            self.audio.inc(audio_seconds)


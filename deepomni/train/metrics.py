"""Training metrics (Prometheus, through ``ray.util.metrics``): what every Ray Train worker reports per step.

Every series carries the tags ``run`` (``TrainConfig.run_name``), ``stage`` and ``rank`` (the worker's world
rank). Scraped names: :func:`exported_names` (``ray_`` prefix, ``_total`` on counters; see
``deepomni/metrics.py``). ``docs/monitoring.md`` lists them with the dashboards and alerts that use them.

Gauges are set every step (a handful of calls). Routed-token counts are summed locally and added to their
counter at most every ``flush_s`` seconds (and when the step loop ends): a large model has layers x
experts x modalities of them.

The routed-token counts come from the MoE layers' own counters (:mod:`deepomni.model.routing_stats`): the
step counts its forward with the token groups :data:`ROUTING_GROUPS` (:func:`token_groups`), and
:func:`modality_counts`, :func:`expert_load` and :func:`routed_outside_mode` turn what it took into the
reported values.
"""

from __future__ import annotations

import time

import torch

from ..data.schema import SPEECH, TEXT
from ..metrics import MetricSpec, make_metric, scraped_names

TAGS = ("run", "stage", "rank")
EXPERT_FLUSH_S = 10.0

METRICS = (
    MetricSpec("deepomni_train_step", "gauge",
               "Optimizer steps done by this run (a resumed run continues its count).", TAGS),
    MetricSpec("deepomni_train_last_step_timestamp_seconds", "gauge",
               "Unix time at which the worker last finished a step (or entered its step loop).", TAGS),
    MetricSpec("deepomni_train_loss", "gauge",
               "Loss of the last step: mean of the channels' cross-entropies plus the balance loss.", TAGS),
    MetricSpec("deepomni_train_channel_loss", "gauge",
               "Cross-entropy of the last step per output channel (text, codec0..codec<K-1>); a channel "
               "without labels in the batch keeps its previous value.", TAGS + ("channel",)),
    MetricSpec("deepomni_train_balance_loss", "gauge",
               "Expert balance (auxiliary) loss of the last step, summed over MoE layers.", TAGS),
    MetricSpec("deepomni_train_learning_rate", "gauge", "Learning rate of the last step.", TAGS),
    MetricSpec("deepomni_train_tokens_per_second", "gauge",
               "Sequence positions per second of the last step (collate + forward + backward + optimizer "
               "step; the data wait excluded).", TAGS),
    MetricSpec("deepomni_train_step_seconds", "gauge",
               "Wall time of the last step, the data wait excluded.", TAGS),
    MetricSpec("deepomni_train_data_wait_seconds", "gauge",
               "Time the last step waited for its batch from the Ray Data shard.", TAGS),
    MetricSpec("deepomni_train_tokens", "counter",
               "Sequence positions trained on (all channels of a position count once).", TAGS),
    MetricSpec("deepomni_train_expert_routed_tokens", "counter",
               "Routed (token, expert) pairs per MoE layer and expert, by the modality of the position "
               "(speech = AUDIO prompt positions and speech answers, text = the rest).",
               TAGS + ("layer", "expert", "modality")),
)
METRIC_NAMES = tuple(m.name for m in METRICS)


# --------------------------------------------------------------------------------- routing statistics
OTHER = "other"  # positions of neither modality (instructions of speech items, padding): counted, not reported
ROUTING_GROUPS = (SPEECH, TEXT, OTHER)  # the training step's token groups (deepomni.model.routing_stats)


def token_groups(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Index into :data:`ROUTING_GROUPS` of every position ``[B, L]``, from the batch's per-modality position
    masks (``collate``'s ``masks``; disjoint): every position is counted, in one group."""
    first = next(iter(masks.values()))
    group_BL = torch.full(first.shape, ROUTING_GROUPS.index(OTHER), dtype=torch.long, device=first.device)
    for modality, mask_BL in masks.items():
        group_BL[mask_BL] = ROUTING_GROUPS.index(modality)
    return group_BL


def modality_counts(routed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per modality: routed (token, expert) pairs per MoE layer (in layer order) and expert,
    ``[layers, experts]``; modalities without positions in the step are left out."""
    return {m: routed[m] for m in (SPEECH, TEXT) if bool(routed[m].any())}


def expert_load(counts: dict[str, torch.Tensor]) -> dict[str, list[list[float]]]:
    """Per modality and MoE layer: fraction of the routed (token, expert) pairs that went to each expert."""
    return {mod: [(c_E.float() / c_E.sum()).tolist() for c_E in c_LE] for mod, c_LE in counts.items()}


def routed_outside_mode(routed: dict[str, torch.Tensor], routing_masks: list[torch.Tensor | None]) -> float:
    """Fraction of the step's routed pairs (all positions) on experts the routing mode forbids, over the MoE
    layers with a routing mask (``routing_masks``, in layer order); 0 when the masks hold."""
    all_LE = sum(routed.values())
    bad = total = 0
    for c_E, mask_E in zip(all_LE, routing_masks):
        if mask_E is None:
            continue
        bad += int(c_E[~mask_E.cpu()].sum())
        total += int(c_E.sum())
    return bad / total if total else 0.0


def exported_names() -> tuple[str, ...]:
    """The names Prometheus scrapes."""
    return scraped_names(METRICS)


def channel_names(num_codec_channels: int) -> list[str]:
    return ["text"] + [f"codec{k}" for k in range(num_codec_channels)]


class TrainMetrics:
    """One worker's metric objects. ``started`` when the step loop begins, ``step`` after each step,
    ``close`` when the loop ends."""

    def __init__(self, run: str, stage: str, rank: int, num_codec_channels: int, flush_s: float = EXPERT_FLUSH_S):
        tags = {"run": run, "stage": stage, "rank": str(rank)}
        self.m = {s.name.removeprefix("deepomni_train_"): make_metric(s, tags) for s in METRICS}
        self.channels = channel_names(num_codec_channels)
        self.flush_s = flush_s
        self._counts: dict[str, torch.Tensor] = {}  # modality -> routed pairs [layers, experts] since flush
        self._layer_ids: list[int] = []
        self._flushed_at = time.monotonic()

    def started(self, step: int) -> None:
        self.m["step"].set(step)
        self.m["last_step_timestamp_seconds"].set(time.time())

    def step(self, metrics: dict, n_tokens: int, expert_counts: dict[str, torch.Tensor], layer_ids: list[int]) -> None:
        """``metrics``: the dict ``train_func`` reports; ``expert_counts``: modality -> ``[layers, experts]``
        routed pairs of this step (:func:`modality_counts`)."""
        m = self.m
        m["step"].set(metrics["step"])
        m["last_step_timestamp_seconds"].set(time.time())
        for gauge, key in (("loss", "loss"), ("balance_loss", "aux_loss"), ("learning_rate", "lr"),
                           ("tokens_per_second", "tokens_per_s"), ("step_seconds", "step_time_s"),
                           ("data_wait_seconds", "data_wait_s")):
            m[gauge].set(float(metrics[key]))
        for name, value in zip(self.channels, metrics["channel_losses"]):
            if value == value:  # NaN: no label of this channel in the batch
                m["channel_loss"].set(float(value), tags={"channel": name})
        if n_tokens:
            m["tokens"].inc(n_tokens)
        self._layer_ids = layer_ids
        for mod, c in expert_counts.items():
            self._counts[mod] = self._counts[mod] + c if mod in self._counts else c.clone()
        if time.monotonic() - self._flushed_at >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        self._flushed_at = time.monotonic()
        for mod, c_LE in self._counts.items():
            for layer, expert in torch.nonzero(c_LE).tolist():
                self.m["expert_routed_tokens"].inc(int(c_LE[layer, expert]), tags={
                    "layer": str(self._layer_ids[layer]), "expert": str(expert), "modality": mod})
        self._counts.clear()

    def close(self) -> None:
        self.flush()

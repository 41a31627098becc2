"""The Grafana dashboards of ``manifests/monitoring/grafana/*.json``, written from the panel lists below.

    python manifests/monitoring/grafana/dashboards.py           # (re)write the JSON files
    python manifests/monitoring/grafana/dashboards.py --check   # exit 1 when a JSON file is stale

Every query names metrics the code exports (``ray_deepomni_*``: serve_apps/metrics.py,
deepomni/train/metrics.py, deepomni/data/metrics.py), Ray Serve's own, or a recording rule of
``../rules/deepomni.rules.yml``; tests/test_monitoring.py checks that. Import: docs/monitoring.md "Grafana".
Only the standard library is needed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"


# ------------------------------------------------------------------------------------------ building blocks
def q(expr: str, legend: str = "") -> dict:
    return {"expr": expr, "legendFormat": legend}


def timeseries(title: str, targets: list[dict], unit: str = "short", description: str = "",
               threshold: float | None = None, stack: bool = False, width: int = 8) -> dict:
    defaults: dict = {"unit": unit, "custom": {"fillOpacity": 10, "showPoints": "never"}}
    if stack:
        defaults["custom"]["stacking"] = {"mode": "normal", "group": "A"}
    if threshold is not None:  # drawn as a red line: the alert's bound
        defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                                {"color": "red", "value": threshold}]}
        defaults["custom"]["thresholdsStyle"] = {"mode": "line"}
    return {"type": "timeseries", "title": title, "description": description, "targets": targets, "width": width,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi"}}}


def heatmap(title: str, expr: str, description: str = "") -> dict:
    """Time on x, one row per expert (series as buckets, no re-bucketing), colour = routed tokens/s."""
    return {"type": "heatmap", "title": title, "description": description,
            "targets": [{"expr": expr, "legendFormat": "{{expert}}", "format": "time_series"}],
            "fieldConfig": {"defaults": {"unit": "short"}, "overrides": []},
            "options": {"calculate": False, "cellGap": 1, "color": {"mode": "scheme", "scheme": "Oranges",
                                                                    "steps": 64},
                        "yAxis": {"axisLabel": "expert"}, "rowsFrame": {"layout": "auto"},
                        "tooltip": {"show": True, "yHistogram": False}, "legend": {"show": True}}}


def stat(title: str, expr: str, unit: str = "short", legend: str = "", width: int = 4) -> dict:
    return {"type": "stat", "title": title, "targets": [q(expr, legend)], "width": width,
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value", "graphMode": "area"}}


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def var(name: str, query: str, label: str, multi: bool = True) -> dict:
    v = {"name": name, "label": label, "type": "query", "datasource": DS, "refresh": 2, "sort": 3,
         "query": query, "definition": query, "multi": multi,
         "includeAll": multi, "current": {}}
    if multi:
        v["allValue"] = ".*"
    return v


def quantiles(metric: str, sel: str, by: str = "") -> list[dict]:
    group = f"{by}, le" if by else "le"
    return [q(f"histogram_quantile({p}, sum by ({group}) (rate({metric}_bucket{{{sel}}}[{RI}])))",
              f"p{int(p * 100)}" + (f" {{{{{by}}}}}" if by else "")) for p in (0.5, 0.99)]


def padded_expert(expr: str) -> str:
    """Experts 0-9 as 00-09, so that the heatmap's rows sort by number."""
    return f'label_replace({expr}, "expert", "0$1", "expert", "^([0-9])$")'


def dashboard(uid: str, title: str, description: str, variables: list[dict], panels: list[dict]) -> dict:
    """Lays the panels out on Grafana's 24-column grid: rows full width, graphs 8 wide unless they say,
    stats 4, heatmaps 12."""
    x = y = 0
    h_row = 0
    laid = []
    for i, p in enumerate(panels, start=1):
        p = {"id": i, "datasource": DS, **p} if p["type"] != "row" else {"id": i, **p}
        width = p.pop("width", None)
        w, h = {"row": (24, 1), "heatmap": (12, 9), "stat": (width, 4)}.get(p["type"], (width, 8))
        if p["type"] == "row" or x + w > 24:
            x, y = 0, y + h_row
            h_row = 0
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        x, h_row = x + w, max(h_row, h)
        if p["type"] == "row":
            x, y, h_row = 0, y + 1, 0
        for j, t in enumerate(p.get("targets", [])):
            t["refId"] = chr(ord("A") + j)
            t["datasource"] = DS
        laid.append(p)
    ds_var = {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
              "current": {}, "hide": 0}
    return {"uid": uid, "title": title, "description": description, "tags": ["deepomni"], "editable": True,
            "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
            "timezone": "browser", "graphTooltip": 1, "templating": {"list": [ds_var, *variables]},
            "annotations": {"list": []}, "links": [], "panels": laid}


# ---------------------------------------------------------------------------------------------- serving
def rate_by(by: str, metric: str, sel: str = "") -> str:
    """Per-second rate of a counter, summed over everything but ``by``."""
    return f"sum by ({by}) (rate({metric}{{{sel}}}[{RI}]))" if by else f"sum(rate({metric}{{{sel}}}[{RI}]))"


def expert_heatmap(metric: str, sel: str, modality: str, description: str = "") -> dict:
    expr = padded_expert(rate_by("expert", metric, f'{sel}, layer="$layer", modality="{modality}"'))
    return heatmap(f"Expert load, {modality} positions (layer $layer)", expr, description)


IMBALANCE_HELP = "Busiest expert / mean over the experts that got tokens of that modality (alert: over 4)."


def serving() -> dict:
    app = 'application=~"$application"'
    return dashboard(
        "deepomni-serving", "DeepOmni / Serving",
        "The Serve app (serve_apps/): latency the client sees, throughput, sessions, errors, replicas, experts.",
        [var("application", "label_values(ray_serve_deployment_replica_healthy, application)", "Application"),
         var("layer", "label_values(ray_deepomni_expert_routed_tokens_total, layer)", "MoE layer", multi=False)],
        [
            row("Latency"),
            timeseries("Time to first audio", quantiles("ray_deepomni_time_to_first_audio_seconds", app), "s",
                       "Request arrival to the first audio chunk sent (alert: p99 over 1 s).", threshold=1.0),
            timeseries("Gap between audio chunks", quantiles("ray_deepomni_audio_chunk_gap_seconds", app), "s",
                       "Between consecutive audio chunks of an answer: above a chunk's duration, playback stalls."),
            timeseries("Real-time factor", quantiles("ray_deepomni_real_time_factor", app), "none",
                       "Answer wall time / answer audio duration; above 1 the answer is slower than real time.",
                       threshold=1.0),
            row("Throughput and sessions"),
            timeseries("Generated tokens / s", [q(rate_by("channel", "ray_deepomni_generated_tokens_total", app),
                                                  "{{channel}}")],
                       "short", "text: text-channel tokens; speech: codec tokens (K per frame).", stack=True),
            timeseries("HTTP requests / s", [q(rate_by("status_code", "ray_serve_num_http_requests_total", app),
                                               "{{status_code}}")],
                       "reqps", "Ray Serve's proxy, by status code.", stack=True),
            timeseries("Active sessions", [q(f"sum by (state) (ray_deepomni_active_sessions{{{app}}})", "{{state}}")],
                       "short", "Sessions decoding in the Backbone replicas' batches, and those queued for rows.",
                       stack=True),
            row("Errors"),
            timeseries("Rejected requests / s", [q(rate_by("reason, endpoint", "ray_deepomni_rejected_requests_total",
                                                           app), "{{reason}} ({{endpoint}})")],
                       "reqps", "Refusals by reason (docs/serving.md 'Errors'); internal_error is a failure of ours.",
                       stack=True),
            timeseries("HTTP 5xx ratio", [q(f"deepomni:serve_http_5xx:ratio5m{{{app}}}", "{{application}}")],
                       "percentunit", "5xx responses / all responses over 5 minutes (alert: over 5 %).",
                       threshold=0.05),
            timeseries("Cancelled answers / s", [q(rate_by("reason", "ray_deepomni_cancelled_sessions_total", app),
                                                   "{{reason}}")],
                       "short", "Answers stopped because the client went away."),
            row("Replicas"),
            timeseries("Healthy replicas", [q(f"sum by (deployment) (ray_serve_deployment_replica_healthy{{{app}}})",
                                              "{{deployment}}")], "short", "Per deployment.", stack=True),
            timeseries("Autoscaling: wanted vs target", [
                q(f"max by (deployment) (ray_serve_autoscaling_desired_replicas{{{app}}})", "wanted {{deployment}}"),
                q(f"max by (deployment) (ray_serve_autoscaling_target_replicas{{{app}}})", "target {{deployment}}")],
                "short", "The policy's decision before the min/max bounds, and the bounded target: wanted above "
                         "target means the deployment is held at max_replicas (alert after 10 minutes).", width=16),
            *experts_row("ray_deepomni_expert_routed_tokens_total", "deepomni:expert_load_imbalance:ratio5m", app,
                         "Routed tokens / s per expert of the chosen MoE layer, all Backbone replicas."),
        ])


def experts_row(counter: str, imbalance: str, sel: str, help_text: str) -> list[dict]:
    """The "Experts" row of serving and training: a heatmap per modality and the imbalance ratio."""
    return [
        row("Experts"),
        expert_heatmap(counter, sel, "speech", help_text),
        expert_heatmap(counter, sel, "text"),
        timeseries("Expert load imbalance (max / mean)", [q(f"{imbalance}{{{sel}}}", "layer {{layer}} {{modality}}")],
                   "none", IMBALANCE_HELP, threshold=4.0, width=24),
    ]


# --------------------------------------------------------------------------------------------- training
def training() -> dict:
    sel = 'run=~"$run", stage=~"$stage"'
    by_run = "{{run}} {{stage}}"
    return dashboard(
        "deepomni-training", "DeepOmni / Training",
        "Ray Train workers of deepomni/train/loop.py, by run and stage.",
        [var("run", "label_values(ray_deepomni_train_step, run)", "Run"),
         var("stage", 'label_values(ray_deepomni_train_step{run=~"$run"}, stage)', "Stage"),
         var("layer", "label_values(ray_deepomni_train_expert_routed_tokens_total, layer)", "MoE layer",
             multi=False)],
        [
            row("Progress"),
            stat("Step", f"max by (run, stage) (ray_deepomni_train_step{{{sel}}})", legend=by_run),
            stat("Since last step", f"deepomni:train_seconds_since_last_step{{{sel}}}", "s", by_run),
            timeseries("Tokens / s", [
                q(rate_by("run, stage", "ray_deepomni_train_tokens_total", sel), by_run),
                q(f"sum by (run, stage) (ray_deepomni_train_tokens_per_second{{{sel}}})", "last step " + by_run)],
                "short", "Sequence positions per second, all workers (the data wait included in the rate, not in "
                         "the last-step figure)."),
            timeseries("Step time and data wait", [
                q(f"avg by (rank) (ray_deepomni_train_step_seconds{{{sel}}})", "step rank {{rank}}"),
                q(f"avg by (rank) (ray_deepomni_train_data_wait_seconds{{{sel}}})", "data wait rank {{rank}}")],
                "s", "A data wait comparable to the step time: the input pipeline is the bottleneck."),
            row("Loss"),
            timeseries("Loss", [q(f"avg by (run, stage) (ray_deepomni_train_loss{{{sel}}})", by_run)],
                       "none", "Mean channel cross-entropy + balance loss, averaged over workers."),
            timeseries("Loss per channel", [q(f"avg by (channel) (ray_deepomni_train_channel_loss{{{sel}}})",
                                              "{{channel}}")], "none", "text and each codec channel."),
            timeseries("Balance loss and learning rate", [
                q(f"avg by (run, stage) (ray_deepomni_train_balance_loss{{{sel}}})", "balance " + by_run),
                q(f"max by (run, stage) (ray_deepomni_train_learning_rate{{{sel}}})", "lr " + by_run)], "none"),
            *experts_row("ray_deepomni_train_expert_routed_tokens_total",
                         "deepomni:train_expert_load_imbalance:ratio5m", sel,
                         "Routed tokens / s per expert, all workers. Under S2's masked routing only the speech "
                         "experts light up."),
        ])


# ------------------------------------------------------------------------------------------------- data
def data() -> dict:
    rows, rejected, audio = ("ray_deepomni_data_rows_total", "ray_deepomni_data_rejected_rows_total",
                             "ray_deepomni_data_audio_seconds_total")
    return dashboard(
        "deepomni-data", "DeepOmni / Data preparation",
        "The Ray Data stages of deepomni/data/pipeline.py (feature -> codec -> sequence).", [],
        [
            row("Totals over the time range"),
            stat("Rows prepared", f'sum(increase({rows}{{stage="sequence"}}[$__range]))', width=8),
            stat("Rows rejected", f"sum(increase({rejected}[$__range]))", width=8),
            stat("Audio processed", f"sum(increase({audio}[$__range]))", "s", width=8),
            row("Throughput"),
            timeseries("Rows / s", [q(rate_by("stage", rows), "{{stage}}")], "short",
                       "Rows each stage processed (every row passes every stage).", width=12),
            timeseries("Audio seconds / s", [q(rate_by("stage", audio), "{{stage}}")], "short",
                       "Seconds of audio decoded per second: questions (feature), answers (codec).", width=12),
            row("Rejections"),
            timeseries("Rejected rows / s", [q(rate_by("stage, reason", rejected), "{{stage}}: {{reason}}")],
                       "short", "Rows kept under status=rejected, by the part that failed (the error column's "
                                "prefix).", stack=True, width=12),
            timeseries("Rejected fraction", [q(rate_by("", rejected) + " / " + rate_by("", rows, 'stage="feature"'),
                                               "rejected")],
                       "percentunit", "Rejected rows / rows read (the feature stage sees every row).", width=12),
        ])


DASHBOARDS = {"serving.json": serving, "training.json": training, "data.json": data}


def render() -> dict[str, str]:
    return {name: json.dumps(build(), indent=1) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: list[str]) -> int:
    stale = []
    for name, text in render().items():
        path = HERE / name
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)} (run python {Path(__file__).relative_to(HERE.parents[2])})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The DeepOmni Ray Serve app: spoken dialogue over HTTP (server-sent events) and WebSocket.

    audio bytes -> SpeechEncoder (log-mel, Whisper encoder, projector)      deployments.py
                -> Backbone (MoE LLM, continuous batching of decode steps)  deployments.py
                -> Vocoder (streaming codec decoder, stateless)             deployments.py
    Ingress (FastAPI: /v1/dialogue, /v1/realtime, /healthz, /)              ingress.py

``app.py`` builds the application (``serve_apps.app:build_app``), ``config.yaml`` sets replicas and
autoscaling, ``protocol.py`` is the wire protocol of ``docs/serving.md``, ``metrics.py`` the Prometheus
metrics.
"""

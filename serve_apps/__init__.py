"""The DeepOmni Ray Serve app: spoken dialogue over HTTP (server-sent events) and WebSocket.

    audio bytes -> SpeechEncoder (log-mel, Whisper encoder, projector)      encoder.py
                -> Backbone (MoE LLM, continuous batching of decode steps)  backbone.py
                -> Vocoder (streaming codec decoder, stateless)             vocoder.py
    Ingress (FastAPI: /v1/dialogue, /v1/realtime, /healthz, /)              ingress.py

``deepomni/serve/messages.py`` holds the typed messages the deployments send each other, ``batching.py`` the call
batcher of the encoder. ``app.py`` builds the application (``serve_apps.app:build_app``), ``config.yaml``
sets every deployment's replicas, autoscaling and resources (the only place that does), ``protocol.py``
is the wire protocol of ``docs/serving.md``, ``metrics.py`` the Prometheus metrics.
"""

"""What several test files share (plain functions and constants; shared fixtures are in tests/conftest.py).
Imported as ``from tests.helpers.<module> import ...`` (pytest puts the repository root on ``sys.path``); no test
file imports another test file. The Serve app's start-up, the readable checkpoint and ``free_port`` are the
benchmarks' (``benchmarks/harness.py``).

* ``serve``: the native surfaces' clients: a spoken question (``speech_wav``), ``POST /v1/dialogue`` and its SSE
  events (``dialogue``, ``sse_events``, ``assert_answer``), the WebSocket (``ws_url``, ``ws_turn``), ``/healthz``'s
  Backbone counters; ``SR``, ``MAX_BODY``.
* ``realtime``: ``WS /v1/realtime`` through the official ``openai`` client: validated server events (``recv``,
  ``until``), a session without VAD (``no_vad``).
* ``browser``: headless Chromium for the page's tests (``CHROMIUM``, ``FLAGS``).
* ``fuzz``: hypothesis strategies of what a client sends (JSON values, mutated audio files, the fields of answer
  options, chat completions and Realtime sessions).
* ``net``: what the processes of a Ray node listen on (loopback only, Ray's token auth), the development head's
  check (``check_head``), an environment without an earlier test's Ray settings (``clean_env``).
* ``cluster``: several Ray nodes on this machine (``cluster/local_cluster.py``) and the test's ``Client``.
* ``train``: ``deepomni train``'s flags parsed (``parse_train``); Ray Train runs' sample logs and registered
  checkpoints; a tiny tokenized corpus written in-process.
* ``codes``: the inverse of the codec delay pattern (``undo_delay``).
* ``manifests``: the generated Kubernetes manifests (``manifests/generated/``) and their generator.
"""

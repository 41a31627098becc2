"""Serving internals that do not depend on Ray Serve: continuous batching of spoken answers (``engine.py``),
the answer loop every host runs (``answer_loop.py``), its messages (``messages.py``) and codec decoding
(``vocoder.py``)."""

"""Serving internals that do not depend on Ray Serve: continuous batching of spoken answers."""

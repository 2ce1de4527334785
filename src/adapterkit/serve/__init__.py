"""``adapterkit serve``: one frozen model, many adapters in one continuous batch, behind an OpenAI-compatible API.

``engine`` runs the model (a background thread; per-sequence KV caches, an adapter per row);
``app`` is the HTTP layer (FastAPI: OpenAI routes, streaming, limits, metrics, keys).
"""

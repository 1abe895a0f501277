"""``clipmask serve``: the HTTP API, for backends in any language (FastAPI on uvicorn).

Stateless: each server talks to the same broker, Redis and storage as the rest of clipmask, and
never imports torch or the engine (import-linter checks it). Modules: the app and its OpenAPI
schema (``app.py``), what the routes share (``context.py``), tokens and allowed locations
(``access.py``), problem details (``problems.py``), request and answer models (``models.py``),
one-image requests (``masks.py``, sending and reading them: ``offload.py``), uploads and the
body limit (``uploads.py``), jobs (``jobs.py``, planned in threads of the server:
``planners.py``), probes (``health.py``), Prometheus metrics (``metrics.py``), and the command
(``server.py``).
"""

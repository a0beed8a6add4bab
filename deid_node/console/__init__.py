"""The operator console: web pages, the JSON API, /metrics and /healthz, served by the node.

- auth.py: users file (scrypt), sessions, CSRF, roles;
- metrics.py: Prometheus families read from the database at scrape time, the health check;
- app.py: the FastAPI application (pages from templates/, API under /api/v1/);
- server.py: uvicorn in a thread of the node, started and stopped with it.
"""

"""The operator console: web pages, the JSON API, /metrics and /healthz, served by the node.

- auth.py: users and API tokens file (scrypt, SHA-256), sessions, CSRF, roles, login locks;
- metrics.py: Prometheus families read from the database at scrape time, the health check;
- data.py: what pages and API show, and the audited operator actions;
- thumbs.py: thumbnails of de-identified images;
- app.py: the FastAPI application (routes, login; pages from templates/, API under /api/v1/);
- server.py: uvicorn in a thread of the node, started and stopped with it.
"""

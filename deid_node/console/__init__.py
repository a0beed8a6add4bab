"""The operator console: web pages, the JSON API, /metrics and /healthz, served by the node.

- auth.py: users and API tokens file (scrypt, SHA-256), sessions, CSRF, roles, failed-login
  limits per (name, address), per address and for the node;
- metrics.py: Prometheus families read from the database at scrape time, the health check;
- data.py: what pages and API show, and the audited operator actions;
- thumbs.py: thumbnails of de-identified images, and the review image of a file held for pixel
  review (frame 0 with the redaction's regions blanked, then outlined);
- app.py: the FastAPI application (routes, login; pages from templates/, API under /api/v1/);
- server.py: uvicorn in a thread of the node, started and stopped with it.
"""

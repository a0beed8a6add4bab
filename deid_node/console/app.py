"""The console's web application: pages, the JSON API under /api/v1/, /metrics and /healthz.

Every page and API answer shows UIDs (original ones), AE titles, states and reasons: never a
header value of the patient. /metrics and /healthz need no login; everything else does, and
every action (POST) also needs the operator role and the session's CSRF token.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, select_autoescape
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from deid_node.console.auth import Session, Sessions, csrf_ok
from deid_node.console.data import ConsoleData
from deid_node.console.metrics import NodeView, health, make_registry
from deid_node.console.thumbs import render_review, render_thumbnail
from deid_node.log import get_logger
from deid_node.store import BATCH_STATES
from deid_node.store import metrics_queries as mq

log = get_logger("deid_node.console")
COOKIE = "deid_console"
# The login form's CSRF token (double submit: this cookie and the form field must match), so
# that another site cannot log a browser in under its own account.
LOGIN_COOKIE = "deid_console_login"


LOCKED_MESSAGES = {
    "name_and_address": (
        "Too many failed logins of this name from this address: try again in 15 minutes"
    ),
    "address": "Too many failed logins from this address: try again in 15 minutes",
    "node": "Too many failed logins on this node: try again in a minute",
}


class LoginRequired(Exception):
    pass


def create_app(view: NodeView, sessions: Sessions, *, secure_cookies: bool = False) -> FastAPI:
    # FastAPI's own docs pages load Swagger UI from a CDN: off. /api/docs is rendered here,
    # from the same OpenAPI document, without JavaScript.
    app = FastAPI(
        title="deid-node console",
        version="1",
        docs_url=None,
        openapi_url="/api/v1/openapi.json",
        redoc_url=None,
    )
    env = Environment(
        loader=PackageLoader("deid_node.console", "templates"),
        autoescape=select_autoescape(["html"]),
    )
    templates = Jinja2Templates(env=env)
    registry = make_registry(view)
    store = view.store

    def session_of(request: Request) -> Session | None:
        return sessions.get(request.cookies.get(COOKIE))

    def page_session(request: Request) -> Session:
        session = session_of(request)
        if session is None:
            raise LoginRequired
        return session

    def api_session(request: Request) -> Session:
        authorization = request.headers.get("Authorization")
        if authorization:
            session = sessions.from_bearer(authorization)
            if session is None:
                raise HTTPException(401, "unknown API token")
            return session
        session = session_of(request)
        if session is None:
            raise HTTPException(401, "log in first (POST /login) or send Authorization: Bearer")
        return session

    def check_action(session: Session, token: str | None) -> None:
        if not csrf_ok(session, token):
            raise HTTPException(403, "missing or wrong CSRF token")
        if not session.can_act:
            raise HTTPException(403, "the operator role is needed for this action")

    def render(request: Request, name: str, session: Session | None, **context: Any) -> Response:
        return templates.TemplateResponse(
            request,
            name,
            {
                "session": session,
                "states": BATCH_STATES,
                "can_release": True,  # both series policies (node: join_withheld)
                **context,
            },
        )

    @app.exception_handler(LoginRequired)
    async def to_login(_request: Request, _exc: LoginRequired) -> Response:
        return RedirectResponse("/login", status_code=303)

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        # Nothing but this origin: no script at all, images and forms only from here.
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; connect-src 'self';"
            " form-action 'self';"
            " frame-ancestors 'none'; base-uri 'none'"
        )
        return response

    # -- open to all: monitoring --------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        checks = health(view)
        return JSONResponse(checks, status_code=200 if checks["ok"] else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # -- login ---------------------------------------------------------------------------------

    def login_page(request: Request, error: str | None) -> Response:
        token = secrets.token_urlsafe(32)
        response = render(request, "login.html", None, error=error, login_csrf=token)
        response.set_cookie(
            LOGIN_COOKIE, token, httponly=True, samesite="strict", secure=secure_cookies, path="/"
        )
        return response

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> Response:
        return login_page(request, None)

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        expected, sent = request.cookies.get(LOGIN_COOKIE, ""), str(form.get("csrf", ""))
        if not expected or not hmac.compare_digest(expected, sent):
            raise HTTPException(403, "missing or wrong CSRF token: load /login again")
        name, password = str(form.get("username", ""))[:64], str(form.get("password", ""))
        # A name nobody has is not logged: it may be a password typed in the wrong field.
        shown = name if sessions.known(name) else "(unknown name)"
        # The client's address as uvicorn gives it: X-Forwarded-For is taken only from
        # 127.0.0.1 (uvicorn's default forwarded_allow_ips: a reverse proxy on this host).
        address = request.client.host if request.client else None
        refusal = sessions.refusal(name, address)
        if refusal is not None:
            log.warning("console_login_locked", user=shown, client=address, scope=refusal)
            response = login_page(request, LOCKED_MESSAGES[refusal])
            response.status_code = 429
            return response
        sid = sessions.login(name, password, address)
        if sid is None:
            log.warning("console_login_failed", user=shown, client=address)
            return login_page(request, "Wrong name or password")
        log.info("console_login", user=name)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE, sid, httponly=True, samesite="strict", secure=secure_cookies, path="/"
        )
        response.delete_cookie(LOGIN_COOKIE, path="/")
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        session = page_session(request)
        form = await request.form()
        if not csrf_ok(session, str(form.get("csrf", ""))):
            raise HTTPException(403, "missing or wrong CSRF token")
        sessions.logout(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    console = ConsoleData(view)

    # -- pages -------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request) -> Response:
        session = page_session(request)
        data = console.overview()
        peak = max([r["n"] for r in data["received_last_hour"]] or [1])
        return render(request, "overview.html", session, data=data, peak=peak)

    @app.get("/series", response_class=HTMLResponse)
    def series_list(
        request: Request,
        state: str | None = None,
        calling_ae: str | None = None,
        since: str | None = None,
        until: str | None = None,
        project: str | None = None,
        page: int = 1,
    ) -> Response:
        session = page_session(request)
        data = console.series(
            state or None,
            calling_ae or None,
            max(page, 1),
            since or None,
            until or None,
            project or None,
        )
        return render(
            request,
            "series.html",
            session,
            data=data,
            state=state or "",
            calling_ae=calling_ae or "",
            since=since or "",
            until=until or "",
            project=project or "",
        )

    @app.get("/series/{uid}", response_class=HTMLResponse)
    def series_page(request: Request, uid: str) -> Response:
        session = page_session(request)
        return render(request, "series_detail.html", session, data=console.detail(uid))

    @app.get("/series/{uid}/thumbnails/{instance_id}.png")
    def thumbnail(request: Request, uid: str, instance_id: int) -> Response:
        page_session(request)
        path = mq.deid_output(store, uid, instance_id)
        png = (
            render_thumbnail(path, max_decoded_bytes=view.max_decoded_bytes)
            if path is not None
            else None
        )
        if png is None:
            raise HTTPException(404, "no de-identified image kept for this instance")
        return Response(png, media_type="image/png")

    @app.post("/series/{uid}/retry")
    async def series_retry_form(request: Request, uid: str) -> Response:
        session = page_session(request)
        form = await request.form()
        check_action(session, str(form.get("csrf", "")))
        console.retry_series(session, uid)
        return RedirectResponse(f"/series/{uid}", status_code=303)

    @app.get("/quarantine", response_class=HTMLResponse)
    def quarantine(request: Request, page: int = 1) -> Response:
        session = page_session(request)
        return render(request, "quarantine.html", session, data=console.quarantine(max(page, 1)))

    def review_png(instance_id: int) -> Response:
        found = mq.quarantine_review(store, instance_id)
        png = (
            render_review(found[0], found[1], max_decoded_bytes=view.max_decoded_bytes)
            if found is not None
            else None
        )
        if png is None:
            raise HTTPException(404, "no image held for pixel review with this id")
        return Response(png, media_type="image/png")

    @app.get("/quarantine/{instance_id}/image.png")
    def quarantine_image(request: Request, instance_id: int) -> Response:
        page_session(request)
        return review_png(instance_id)

    @app.post("/quarantine/refused/{refused_id}/discard")
    async def refused_discard_form(request: Request, refused_id: int) -> Response:
        session = page_session(request)
        form = await request.form()
        check_action(session, str(form.get("csrf", "")))
        console.discard_refused(session, refused_id)
        return RedirectResponse("/quarantine", status_code=303)

    @app.post("/quarantine/{instance_id}/{action}")
    async def quarantine_form(request: Request, instance_id: int, action: str) -> Response:
        session = page_session(request)
        form = await request.form()
        check_action(session, str(form.get("csrf", "")))
        console.act_on_quarantine(session, instance_id, action)
        return RedirectResponse("/quarantine", status_code=303)

    @app.get("/audit", response_class=HTMLResponse)
    def audit(request: Request, page: int = 1) -> Response:
        session = page_session(request)
        return render(request, "audit.html", session, data=console.audit(max(page, 1)))

    # -- JSON API ------------------------------------------------------------------------------

    @app.get("/api/docs", response_class=HTMLResponse, include_in_schema=False)
    def api_docs(request: Request) -> Response:
        session = page_session(request)
        paths = [
            {"path": path, "method": method.upper(), "summary": op.get("summary", "")}
            for path, item in sorted(app.openapi()["paths"].items())
            for method, op in item.items()
            if path.startswith("/api/")
        ]
        return render(request, "api_docs.html", session, paths=paths)

    @app.get("/api/v1/overview")
    def api_overview(request: Request) -> dict[str, Any]:
        api_session(request)
        return console.overview()

    @app.get("/api/v1/series")
    def api_series(
        request: Request,
        state: str | None = None,
        calling_ae: str | None = None,
        since: str | None = None,
        until: str | None = None,
        project: str | None = None,
        page: int = 1,
    ) -> dict[str, Any]:
        """Series rounds, newest first; filters: state, calling AE, project, days received."""
        api_session(request)
        return console.series(state, calling_ae, max(page, 1), since, until, project)

    @app.get("/api/v1/series/{uid}")
    def api_series_detail(request: Request, uid: str) -> dict[str, Any]:
        api_session(request)
        return console.detail(uid)

    @app.post("/api/v1/series/{uid}/retry")
    def api_series_retry(request: Request, uid: str) -> dict[str, Any]:
        session = api_session(request)
        check_action(session, request.headers.get("X-CSRF-Token"))
        return console.retry_series(session, uid)

    @app.get("/api/v1/quarantine")
    def api_quarantine(request: Request, page: int = 1) -> dict[str, Any]:
        api_session(request)
        return console.quarantine(max(page, 1))

    @app.get("/api/v1/quarantine/{instance_id}/image.png")
    def api_quarantine_image(request: Request, instance_id: int) -> Response:
        """Frame 0 of a file held for pixel review as it would leave: the regions the
        redaction blanks filled black, then outlined (PNG)."""
        api_session(request)
        return review_png(instance_id)

    @app.post("/api/v1/quarantine/refused/{refused_id}/discard")
    def api_refused_discard(request: Request, refused_id: int) -> dict[str, Any]:
        session = api_session(request)
        check_action(session, request.headers.get("X-CSRF-Token"))
        return console.discard_refused(session, refused_id)

    @app.post("/api/v1/quarantine/{instance_id}/{action}")
    def api_quarantine_action(request: Request, instance_id: int, action: str) -> dict[str, Any]:
        session = api_session(request)
        check_action(session, request.headers.get("X-CSRF-Token"))
        return console.act_on_quarantine(session, instance_id, action)

    @app.get("/api/v1/audit")
    def api_audit(request: Request, page: int = 1) -> dict[str, Any]:
        api_session(request)
        return console.audit(max(page, 1))

    @app.get("/api/v1/session")
    def api_me(request: Request) -> dict[str, Any]:
        session = api_session(request)
        return {"user": session.user, "role": session.role, "csrf": session.csrf}

    return app

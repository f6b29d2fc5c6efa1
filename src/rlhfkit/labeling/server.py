"""The labeling web app: a page where people pick the better completion, and the JSON API behind it.

Every API call carries ``Authorization: Bearer TOKEN`` (labeler or admin). Database work runs in
FastAPI's thread pool, each call in its own SQLite transaction (see ``store``). Pages are static
files whose inline script and style are pinned by hash in a Content-Security-Policy, and model
output only ever reaches the DOM through ``textContent``: a completion is text, never markup.

Routes:
    GET  /                   labeling page (open with ``#token=...``)
    GET  /admin              admin page (``#token=ADMIN``): live ``label stats``
    GET  /healthz            liveness, no token
    GET  /api/next           200 {pair_id, prompt, a, b, progress, messages?} or 204 when done
    POST /api/label          {pair_id, choice: a|b|tie|skip, note?} -> 200; 409 not assigned; 422 bad body
    POST /api/undo           withdraw this labeler's last label; its pair comes back next; 409 if none
    GET  /api/progress       {labeler, done, remaining}
    GET  /api/admin/stats    statistics (admin token; a labeler's token gets 403)
    GET  /api/admin/labelers labelers and their label counts
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlhfkit.data import prompt_text
from rlhfkit.labeling.store import (
    MAX_NOTE_CHARS,
    AlreadyLabeledError,
    Labeler,
    LabelStore,
    NotAssignedError,
    NothingToUndoError,
)

MAX_BODY_BYTES = 64 * 1024
MAX_TOKEN_CHARS = 256
DEFAULT_LEASE_SECONDS = 30 * 60.0

SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


class LabelRequest(BaseModel):
    """Body of ``POST /api/label``; strict, so ``"1"`` is not a pair id and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)

    pair_id: int = Field(ge=1, le=2**63 - 1, description="pair_id from GET /api/next")
    choice: Literal["a", "b", "tie", "skip"] = Field(description="a: left better, b: right better")
    note: str | None = Field(default=None, max_length=MAX_NOTE_CHARS, description="optional free text")


class _Guard:
    """Pure ASGI wrapper: rejects bodies over ``max_body_bytes`` with 413 and adds security headers.

    The declared Content-Length is checked before anything is read; a chunked body is counted as it
    arrives, so a client can never make the server buffer more than the limit.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    if key not in headers:
                        headers[key] = value
            await send(message)

        too_large = f"request body over {self.max_body_bytes} bytes"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            status, detail = (413, too_large) if declared.isdigit() else (400, "bad Content-Length")
            await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send_with_headers)
            return
        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, too_large)  # FastAPI re-raises it from body parsing as a 413
            return message

        await self.app(scope, bounded_receive, send_with_headers)


def _csp(html: str) -> str:
    """A policy allowing exactly the page's own inline script and style blocks, nothing else.

    Even if some text did end up parsed as HTML, an injected ``<script>`` or ``onerror=`` would
    not run: only the hashed blocks may.
    """

    def digests(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    scripts, styles = digests("script") or "'none'", digests("style") or "'none'"
    return (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _page(name: str) -> HTMLResponse:
    html = resources.files("rlhfkit.labeling").joinpath(name).read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"content-security-policy": _csp(html)})


def _readable(exc: RequestValidationError) -> str:
    """``field: what is wrong`` for each problem, without pydantic's internals."""
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            problems.append(f"body: invalid JSON ({(err.get('ctx') or {}).get('error', 'cannot parse')})")
            continue
        where = ".".join(loc) or "body"
        msg = err.get("msg", "invalid")
        if where == "body" and err.get("type") in ("missing", "model_attributes_type", "dict_type"):
            msg = 'expected a JSON object {"pair_id", "choice", "note"?}'
        problems.append(f"{where}: {msg}")
    return "; ".join(problems) or "invalid request"


def create_app(
    db_path: str | Path,
    *,
    overlap: int | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The labeling app on one database; ``overlap`` (if given) is stored, else the stored one is used."""
    store = LabelStore(db_path)
    if overlap is not None:
        store.set_overlap(overlap)
    app = FastAPI(title="rlhfkit labeling", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    app.add_middleware(_Guard, max_body_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _readable(exc)}, status_code=422)

    def bearer(request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
            raise HTTPException(
                401, "missing or malformed 'Authorization: Bearer TOKEN' header", headers={"WWW-Authenticate": "Bearer"}
            )
        return token

    def current_labeler(token: str = Depends(bearer)) -> Labeler:
        labeler = store.labeler_for_token(token)
        if labeler is not None:
            return labeler
        if store.is_admin_token(token):
            raise HTTPException(403, "this is the admin token; labeling needs a labeler's token")
        raise HTTPException(401, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})

    def current_admin(token: str = Depends(bearer)) -> None:
        if store.is_admin_token(token):
            return
        if store.labeler_for_token(token) is not None:
            raise HTTPException(403, "admin only: a labeler's token cannot read this")
        raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", include_in_schema=False)
    def labeling_page() -> HTMLResponse:
        return _page("page.html")

    @app.get("/admin", include_in_schema=False)
    def admin_page() -> HTMLResponse:
        return _page("admin.html")

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/api/next", response_model=None)
    def next_pair(labeler: Labeler = Depends(current_labeler)) -> Response | dict[str, Any]:
        view = store.next_pair(labeler, lease_seconds)
        if view is None:
            return Response(status_code=204)
        body: dict[str, Any] = {
            "pair_id": view.pair_id,
            "prompt": prompt_text(view.prompt),
            "a": view.a,
            "b": view.b,
            "progress": store.progress(labeler, lease_seconds),
        }
        if isinstance(view.prompt, list):
            body["messages"] = view.prompt
        return body

    @app.post("/api/label")
    def post_label(body: LabelRequest, labeler: Labeler = Depends(current_labeler)) -> dict[str, Any]:
        try:
            label_id, created = store.add_label(labeler, body.pair_id, body.choice, body.note)
        except (NotAssignedError, AlreadyLabeledError) as exc:
            raise HTTPException(409, str(exc)) from None
        return {
            "ok": True,
            "label_id": label_id,
            "duplicate": not created,
            "progress": store.progress(labeler, lease_seconds),
        }

    @app.post("/api/undo")
    def post_undo(labeler: Labeler = Depends(current_labeler)) -> dict[str, Any]:
        try:
            undone = store.undo(labeler)
        except NothingToUndoError as exc:
            raise HTTPException(409, str(exc)) from None
        return {"ok": True, "undone": undone, "progress": store.progress(labeler, lease_seconds)}

    @app.get("/api/progress")
    def get_progress(labeler: Labeler = Depends(current_labeler)) -> dict[str, Any]:
        return {"labeler": labeler.name, **store.progress(labeler, lease_seconds)}

    @app.get("/api/admin/stats", dependencies=[Depends(current_admin)])
    def admin_stats() -> dict[str, Any]:
        return store.stats()

    @app.get("/api/admin/labelers", dependencies=[Depends(current_admin)])
    def admin_labelers() -> list[dict[str, Any]]:
        return store.list_labelers()

    return app


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Run the app with uvicorn until Ctrl+C (or a signal); every acknowledged label is already on disk."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)

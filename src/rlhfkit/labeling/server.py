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
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhfkit.data import prompt_text
from rlhfkit.labeling.store import (
    MAX_NOTE_CHARS,
    AlreadyLabeledError,
    Labeler,
    LabelStore,
    NotAssignedError,
    NothingToUndoError,
)
from rlhfkit.web import BodyLimit, unreadable_body

MAX_BODY_BYTES = 64 * 1024
MAX_TOKEN_CHARS = 256
DEFAULT_LEASE_SECONDS = 30 * 60.0

SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


class Detail(BaseModel):
    """Every error: a readable sentence (or ``field: problem; ...`` for a bad body)."""

    detail: str


class Progress(BaseModel):
    done: int = Field(description="labels this labeler has given")
    remaining: int = Field(description="pairs they could still get (others may take some first)")


class NextPair(BaseModel):
    pair_id: int
    prompt: str = Field(description="the prompt as text (a conversation joined by roles)")
    a: str
    b: str
    progress: Progress
    messages: list[dict[str, Any]] | None = Field(None, description="the conversation, when the prompt is one")


class LabelResult(BaseModel):
    ok: bool
    label_id: int
    duplicate: bool = Field(description="true: the very same label was already stored (a retried request)")
    progress: Progress


class UndoneLabel(BaseModel):
    label_id: int
    pair_id: int
    choice: str
    note: str | None


class UndoResult(BaseModel):
    ok: bool
    undone: UndoneLabel
    progress: Progress


class LabelerProgress(Progress):
    labeler: str


class LabelerRow(BaseModel):
    name: str
    created_at: str
    revoked_at: str | None
    labels: int
    last_label_at: str | None


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the errors a route can give, all shaped ``{"detail": str}``."""
    meaning = {
        401: "missing, malformed or unknown token",
        403: "a token of the wrong role",
        409: "the pair is not assigned to this labeler, or nothing to undo",
        413: "body over the size limit",
        422: "body is not what the route expects (or not UTF-8 JSON at all)",
    }
    return {status: {"model": Detail, "description": meaning[status]} for status in statuses}


AUTH_ERRORS = (401, 403)


class LabelRequest(BaseModel):
    """Body of ``POST /api/label``; strict, so ``"1"`` is not a pair id and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)

    pair_id: int = Field(ge=1, le=2**63 - 1, description="pair_id from GET /api/next")
    choice: Literal["a", "b", "tie", "skip"] = Field(description="a: left better, b: right better")
    note: str | None = Field(default=None, max_length=MAX_NOTE_CHARS, description="optional free text")


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
    app.add_middleware(
        BodyLimit,
        max_body_bytes=max_body_bytes,
        error_body=lambda _status, message: {"detail": message},
        headers=SECURITY_HEADERS,
    )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _readable(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)  # what FastAPI raises for an unparsable body
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        unreadable = unreadable_body(exc)
        if unreadable:  # a body that is not even text or JSON: the same 422 as any other bad body
            return JSONResponse({"detail": unreadable}, status_code=422)
        return await http_exception_handler(request, exc)

    documented_bearer = HTTPBearer(auto_error=False, description="a labeler's token, or the admin token")

    def bearer(request: Request, _scheme: Any = Depends(documented_bearer)) -> str:
        # HTTPBearer only puts the scheme into the OpenAPI schema; this parse gives the readable errors.
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

    @app.get(
        "/api/next",
        response_model=NextPair,
        response_model_exclude_none=True,  # "messages" only when the prompt is a conversation
        responses={204: {"description": "nothing left for this labeler"}, **_errors(*AUTH_ERRORS)},
    )
    def next_pair(labeler: Labeler = Depends(current_labeler)) -> Any:
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

    @app.post("/api/label", response_model=LabelResult, responses=_errors(*AUTH_ERRORS, 409, 413, 422))
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

    @app.post("/api/undo", response_model=UndoResult, responses=_errors(*AUTH_ERRORS, 409, 413, 422))
    def post_undo(labeler: Labeler = Depends(current_labeler)) -> dict[str, Any]:
        try:
            undone = store.undo(labeler)
        except NothingToUndoError as exc:
            raise HTTPException(409, str(exc)) from None
        return {"ok": True, "undone": undone, "progress": store.progress(labeler, lease_seconds)}

    @app.get("/api/progress", response_model=LabelerProgress, responses=_errors(*AUTH_ERRORS))
    def get_progress(labeler: Labeler = Depends(current_labeler)) -> dict[str, Any]:
        return {"labeler": labeler.name, **store.progress(labeler, lease_seconds)}

    @app.get("/api/admin/stats", dependencies=[Depends(current_admin)], responses=_errors(*AUTH_ERRORS))
    def admin_stats() -> dict[str, Any]:
        return store.stats()

    @app.get(
        "/api/admin/labelers",
        dependencies=[Depends(current_admin)],
        response_model=list[LabelerRow],
        responses=_errors(*AUTH_ERRORS),
    )
    def admin_labelers() -> list[dict[str, Any]]:
        return store.list_labelers()

    return app


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Run the app with uvicorn until Ctrl+C (or a signal); every acknowledged label is already on disk."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)

"""The labeling web app: a page where people pick the better completion, and the JSON API behind it.

Every API call carries ``Authorization: Bearer TOKEN`` (labeler or admin). Database work runs in
FastAPI's thread pool, each call in its own SQLite transaction (see ``store``). Pages are static
files whose inline script and style are pinned by hash in a Content-Security-Policy, and model
output only ever reaches the DOM through ``textContent``: a completion is text, never markup.

Routes:
    GET  /                   labeling page (open with ``#token=...``)
    GET  /admin              admin page (``#token=ADMIN``): live ``label stats``
    GET  /healthz            liveness, no token
    GET  /api/guidelines     {sha256, html, acknowledged}: the campaign's criteria as sanitised HTML
    POST /api/acknowledge    {sha256} -> 200; 409 when the guidelines changed meanwhile
    GET  /api/next           pair mode: 200 {kind: "pair", pair_id, prompt, a, b, progress, messages?};
                             rank mode: 200 {kind: "rank", prompt_id, prompt, completions: [{id, text}], ...};
                             204 when done; 428 until the current guidelines are acknowledged. A pair_id
                             here is the pair's random public id: ids say nothing of import order
    POST /api/label          {pair_id, choice: a|b|tie|skip, strength?: much|slightly, note?} -> 200;
                             409 not assigned or wrong mode; 422 bad body; 428 guidelines not acknowledged
    POST /api/rank           {prompt_id, order: [completion ids, best first], note?} -> 200; same errors
    POST /api/undo           withdraw this labeler's last label (or ranking); it comes back next; 409 if none
    GET  /api/progress       {labeler, done, remaining, mode}
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
    MAX_RANK_COMPLETIONS,
    AlreadyLabeledError,
    BadRankingError,
    GuidelinesChangedError,
    GuidelinesNotAcknowledgedError,
    Labeler,
    LabelStore,
    NotAssignedError,
    NothingToUndoError,
    PairView,
    WrongModeError,
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
    kind: Literal["pair"] = "pair"
    pair_id: int
    prompt: str = Field(description="the prompt as text (a conversation joined by roles)")
    a: str
    b: str
    progress: Progress
    messages: list[dict[str, Any]] | None = Field(None, description="the conversation, when the prompt is one")


class Completion(BaseModel):
    id: int
    text: str


class NextRanking(BaseModel):
    kind: Literal["rank"] = "rank"
    prompt_id: int
    prompt: str = Field(description="the prompt as text (a conversation joined by roles)")
    completions: list[Completion] = Field(description="in the order shown; rank them by id, best first")
    progress: Progress
    messages: list[dict[str, Any]] | None = Field(None, description="the conversation, when the prompt is one")


class LabelResult(BaseModel):
    ok: bool
    label_id: int
    duplicate: bool = Field(description="true: the very same label was already stored (a retried request)")
    progress: Progress


class RankResult(BaseModel):
    ok: bool
    ranking_id: int
    duplicate: bool = Field(description="true: the very same ranking was already stored (a retried request)")
    progress: Progress


class UndoneLabel(BaseModel):
    kind: Literal["pair", "rank"]
    note: str | None
    label_id: int | None = None
    pair_id: int | None = None
    choice: str | None = None
    strength: str | None = None
    ranking_id: int | None = None
    prompt_id: int | None = None
    order: list[int] | None = None


class UndoResult(BaseModel):
    ok: bool
    undone: UndoneLabel
    progress: Progress


class LabelerProgress(Progress):
    labeler: str
    mode: str = Field(description="pair: pick the better of two; rank: order all completions of a prompt")


class Guidelines(BaseModel):
    sha256: str | None = Field(description="hash of the guidelines' Markdown; null when there are none")
    html: str = Field(description="the guidelines rendered from Markdown and sanitised (raw HTML is never kept)")
    acknowledged: bool


class AcknowledgeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    sha256: str = Field(min_length=64, max_length=64, description="sha256 from GET /api/guidelines")


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
        409: "not assigned to this labeler, already labelled, the other mode, changed guidelines, or nothing to undo",
        413: "body over the size limit",
        422: "body is not what the route expects (or not UTF-8 JSON at all)",
        428: "the current guidelines must be acknowledged first",
    }
    return {status: {"model": Detail, "description": meaning[status]} for status in statuses}


AUTH_ERRORS = (401, 403)


class LabelRequest(BaseModel):
    """Body of ``POST /api/label``; strict, so ``"1"`` is not a pair id and unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)

    pair_id: int = Field(ge=1, le=2**63 - 1, description="pair_id from GET /api/next")
    choice: Literal["a", "b", "tie", "skip"] = Field(description="a: left better, b: right better")
    strength: Literal["much", "slightly"] | None = Field(
        default=None, description="how much better the chosen one is (only with a or b)"
    )
    note: str | None = Field(default=None, max_length=MAX_NOTE_CHARS, description="optional free text")


class RankRequest(BaseModel):
    """Body of ``POST /api/rank``: the task's completion ids, best first."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt_id: int = Field(ge=1, le=2**63 - 1, description="prompt_id from GET /api/next")
    order: list[int] = Field(min_length=2, max_length=MAX_RANK_COMPLETIONS, description="completion ids, best first")
    note: str | None = Field(default=None, max_length=MAX_NOTE_CHARS, description="optional free text")


GUIDELINE_TAGS = {
    "h1", "h2", "h3", "h4", "h5", "h6", "p", "ul", "ol", "li", "strong", "em", "code", "pre", "blockquote",
    "a", "hr", "br", "del", "s", "table", "thead", "tbody", "tr", "th", "td",
}  # fmt: skip


def render_guidelines(markdown: str) -> str:
    """Markdown to HTML with raw HTML escaped (markdown-it, ``html`` off), then an allow-list sanitiser
    (nh3): no script, no event handler, no ``javascript:`` link can come out, whatever the file holds."""
    import markdown_it
    import nh3

    html = markdown_it.MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return nh3.clean(html, tags=GUIDELINE_TAGS, attributes={"a": {"href", "title"}}, url_schemes={"http", "https"})


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


BODIES = {
    "/api/label": '{"pair_id", "choice", "strength"?, "note"?}',
    "/api/rank": '{"prompt_id", "order", "note"?}',
    "/api/acknowledge": '{"sha256"}',
}


def _readable(exc: RequestValidationError, path: str) -> str:
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
            msg = f"expected a JSON object {BODIES.get(path, '')}".rstrip()
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
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _readable(exc, request.url.path)}, status_code=422)

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

    @app.get("/api/guidelines", response_model=Guidelines, responses=_errors(*AUTH_ERRORS))
    def get_guidelines(labeler: Labeler = Depends(current_labeler)) -> dict[str, Any]:
        markdown, digest = store.guidelines()
        return {
            "sha256": digest,
            "html": render_guidelines(markdown) if markdown else "",
            "acknowledged": store.has_acknowledged(labeler),
        }

    @app.post("/api/acknowledge", responses=_errors(*AUTH_ERRORS, 409, 413, 422))
    def post_acknowledge(body: AcknowledgeRequest, labeler: Labeler = Depends(current_labeler)) -> dict[str, bool]:
        try:
            store.acknowledge(labeler, body.sha256)
        except GuidelinesChangedError as exc:
            raise HTTPException(409, str(exc)) from None
        return {"ok": True}

    @app.get(
        "/api/next",
        response_model=NextPair | NextRanking,
        response_model_exclude_none=True,  # "messages" only when the prompt is a conversation
        responses={204: {"description": "nothing left for this labeler"}, **_errors(*AUTH_ERRORS, 428)},
    )
    def next_task(labeler: Labeler = Depends(current_labeler)) -> Any:
        if not store.has_acknowledged(labeler):
            raise HTTPException(428, "read and acknowledge the labeling guidelines first")
        view = (
            store.next_ranking(labeler, lease_seconds)
            if store.mode == "rank"
            else store.next_pair(labeler, lease_seconds)
        )
        if view is None:
            return Response(status_code=204)
        body: dict[str, Any] = {"prompt": prompt_text(view.prompt), "progress": store.progress(labeler, lease_seconds)}
        if isinstance(view, PairView):
            body.update(kind="pair", pair_id=view.public_id, a=view.a, b=view.b)
        else:
            body.update(
                kind="rank", prompt_id=view.prompt_id, completions=[{"id": i, "text": t} for i, t in view.completions]
            )
        if isinstance(view.prompt, list):
            body["messages"] = view.prompt
        return body

    def refused(exc: Exception) -> HTTPException:
        """The HTTP error for a label the store refused."""
        if isinstance(exc, GuidelinesNotAcknowledgedError):
            return HTTPException(428, str(exc))
        if isinstance(exc, BadRankingError):
            return HTTPException(422, str(exc))
        return HTTPException(409, str(exc))

    label_errors = (NotAssignedError, AlreadyLabeledError, WrongModeError, GuidelinesNotAcknowledgedError)

    @app.post("/api/label", response_model=LabelResult, responses=_errors(*AUTH_ERRORS, 409, 413, 422, 428))
    def post_label(body: LabelRequest, labeler: Labeler = Depends(current_labeler)) -> dict[str, Any]:
        if body.strength is not None and body.choice not in ("a", "b"):
            raise HTTPException(422, "strength: only with choice a or b")
        pair_id = store.pair_id_for(body.pair_id)
        if pair_id is None:
            raise HTTPException(409, f"pair {body.pair_id} is not assigned to {labeler.name}")
        try:
            label_id, created = store.add_label(labeler, pair_id, body.choice, body.note, body.strength)
        except NotAssignedError:  # named by the id the labeler knows, never the stored one
            raise HTTPException(409, f"pair {body.pair_id} is not assigned to {labeler.name}") from None
        except AlreadyLabeledError:
            raise HTTPException(409, f"pair {body.pair_id} already has your label; undo it first") from None
        except label_errors as exc:
            raise refused(exc) from None
        return {
            "ok": True,
            "label_id": label_id,
            "duplicate": not created,
            "progress": store.progress(labeler, lease_seconds),
        }

    @app.post("/api/rank", response_model=RankResult, responses=_errors(*AUTH_ERRORS, 409, 413, 422, 428))
    def post_rank(body: RankRequest, labeler: Labeler = Depends(current_labeler)) -> dict[str, Any]:
        try:
            ranking_id, created = store.add_ranking(labeler, body.prompt_id, body.order, body.note)
        except (*label_errors, BadRankingError) as exc:
            raise refused(exc) from None
        return {
            "ok": True,
            "ranking_id": ranking_id,
            "duplicate": not created,
            "progress": store.progress(labeler, lease_seconds),
        }

    @app.post("/api/undo", response_model=UndoResult, responses=_errors(*AUTH_ERRORS, 409, 413, 422))
    def post_undo(labeler: Labeler = Depends(current_labeler)) -> dict[str, Any]:
        try:
            undone = store.undo(labeler)
        except NothingToUndoError as exc:
            raise HTTPException(409, str(exc)) from None
        if undone["kind"] == "pair":
            undone["pair_id"] = store.public_id_of(undone["pair_id"])
        return {"ok": True, "undone": undone, "progress": store.progress(labeler, lease_seconds)}

    @app.get("/api/progress", response_model=LabelerProgress, responses=_errors(*AUTH_ERRORS))
    def get_progress(labeler: Labeler = Depends(current_labeler)) -> dict[str, Any]:
        return {"labeler": labeler.name, "mode": store.mode, **store.progress(labeler, lease_seconds)}

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

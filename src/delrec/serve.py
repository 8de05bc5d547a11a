"""A small HTTP service and web page over a trained run: ``delrec serve RUN`` → http://127.0.0.1:8000/.

Endpoints (schemas at ``/openapi.json``; no ``/docs`` page: Swagger UI loads its scripts from a CDN, and the
service must work offline):
  POST /recommend   {history, k, candidates?, all_items?, seed?} → top-k with scores
  POST /explain     {history, k, candidates?, seed?} → top-k, leave-one-out influence of each history item,
                    the teacher's top-k
  GET  /items?q=    title search (autocomplete on the page)
  GET  /health      what is loaded (HEAD too, for load balancers)
  GET  /            the page (static files in ``serve_static/``, no CDN, no build step)

One model on one device: inference is serialized with a lock (FastAPI runs the sync endpoints in a thread pool).
Bad input (too long a history, an unknown title, k out of range) is answered 422 with a one-line ``detail``
that never echoes more than a few hundred characters of the input; a body larger than any valid request is answered
413 before it is parsed.
"""

import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt

from delrec.errors import DelrecError, clip
from delrec.recommend import DELRec
from delrec.settings import MAX_SEED

STATIC = Path(__file__).parent / "serve_static"
MAX_TITLE = 1000  # characters of one title in a request; real titles are < 300


def _short_title(ref: int | str) -> int | str:
    if isinstance(ref, str) and len(ref) > MAX_TITLE:
        raise ValueError(f"a title has at most {MAX_TITLE} characters, got {len(ref)}")
    return ref


# an item index (1..n_items) or a title (exact, case-insensitive or fuzzy); checked after the union so the error
# names the entry once instead of once per union member
ItemRef = Annotated[StrictInt | str, AfterValidator(_short_title)]
Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED, description="seed for the drawn candidate set")]


class BodyLimit:
    """ASGI middleware: answer 413 to a request body over ``max_bytes`` before anything reads it whole (by its
    Content-Length, or while it streams in when chunked)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._reject(send)
            return
        seen, rejected = 0, False

        async def limited() -> dict[str, Any]:
            # Past the limit: answer 413 ourselves and tell the app the client left (an exception raised here would
            # become FastAPI's 400 "error parsing the body").
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    rejected = True
                    await self._reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: dict[str, Any]) -> None:
            if not rejected:
                await send(message)

        try:
            await self.app(scope, limited, guarded)
        except Exception:
            if not rejected:  # the app's own errors are not ours to hide
                raise

    async def _reject(self, send: Any) -> None:
        body = f'{{"detail": "request body larger than {self.max_bytes} bytes"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class Item(BaseModel):
    item: int = Field(description="item index in the run's dataset (1..n_items)")
    title: str


class Scored(Item):
    score: float = Field(description="the LLM's title log-likelihood (per-token mean or sum, the run's "
                                      "scoring.reduce); higher is better")


class InfluenceOut(Item):
    position: int = Field(description="0-based position in the prompt's history, oldest first")
    influence: float = Field(description="top item's score drop when this history item is removed (> 0: it helped)")


class TeacherPickOut(Item):
    rank: int = Field(description="1-based rank in the teacher's full-catalogue top-k")
    in_candidates: bool = Field(description="whether the LLM ranked this item among its candidates")


class RecommendResponse(BaseModel):
    recommendations: list[Scored] = Field(description="best first")
    history: list[Item] = Field(description="the history as resolved to items")
    candidates: Literal["given", "drawn", "all"] = Field(description="where the candidate set came from")
    n_candidates: int
    seconds: float = Field(description="inference time, excluding time spent waiting for the model lock")


class ExplainResponse(BaseModel):
    recommendations: list[Scored]
    influences: list[InfluenceOut] = Field(description="for recommendations[0], most supporting first")
    teacher: str | None = Field(description="the distilled teacher's name; null if the run has none")
    teacher_topk: list[TeacherPickOut]
    history: list[Item] = Field(description="the history as it went into the prompt (after truncation)")
    candidates: list[Item] = Field(description="the candidate set, in prompt order")
    seconds: float


class Health(BaseModel):
    status: Literal["ok"]
    dataset: str
    domain: str
    n_items: int
    n_users: int
    backbone: str
    soft_prompt: bool
    adapter: bool
    teacher: str | None
    history_len: int
    candidates: int
    max_history: int
    max_candidates: int


class ItemsResponse(BaseModel):
    items: list[Item]


class ErrorResponse(BaseModel):
    detail: str = Field(description="one-line description of what was wrong")
    errors: list[dict[str, Any]] = Field(default_factory=list, description="per-field validation errors")


def create_app(model: DELRec, max_history: int = 50, max_candidates: int = 100) -> FastAPI:
    """The FastAPI app over a loaded model; bounds apply to every request.

    CLI (``delrec serve RUN``): ``--max-history`` (items per request, default 50) and ``--max-candidates``
    (given candidates and k, default 100; an all-items ranking is refused when the catalogue is larger).
    """
    lock = threading.Lock()

    class RecommendRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        history: list[ItemRef] = Field(min_length=1, max_length=max_history,
                                       description="items the user interacted with, oldest first: titles or indices",
                                       examples=[["Toy Story (1995)", "Fargo (1996)"]])
        # Strict: `"k": true` or `"k": "10"` is a client bug, not 1 or 10.
        k: StrictInt = Field(10, ge=1, le=max_candidates, description="number of recommendations")
        candidates: list[ItemRef] | None = Field(None, min_length=1, max_length=max_candidates,
                                                 description="items to rank; default: 20 drawn outside the history")
        all_items: StrictBool = Field(False, description="rank every item outside the history (small catalogues only)")
        seed: Seed = 0

    class ExplainRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        history: list[ItemRef] = Field(min_length=1, max_length=max_history)
        k: StrictInt = Field(10, ge=1, le=max_candidates)
        candidates: list[ItemRef] | None = Field(None, min_length=1, max_length=max_candidates)
        seed: Seed = 0

    # No /docs or /redoc: their pages load Swagger UI / ReDoc from a CDN; /openapi.json is served.
    app = FastAPI(title="DELRec", version=_version(), docs_url=None, redoc_url=None,
                  description="Sequential recommendation with an LLM distilled from a conventional recommender.")
    # The largest valid request: every history and candidate entry a title of MAX_TITLE characters (JSON-escaped
    # up to 6 bytes each), plus the small fields.
    app.add_middleware(BodyLimit, max_bytes=(max_history + max_candidates) * (6 * MAX_TITLE + 8) + 4096)
    responses: dict[int | str, dict[str, Any]] = {422: {"model": ErrorResponse, "description": "invalid input"}}

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Never echo the input: pydantic's "input" is left out, and a key or message is clipped (an unknown key
        # may be megabytes long); at most 10 errors.
        errors = [{"loc": [clip(str(p), 80) for p in e.get("loc", ()) if p != "body"],
                   "msg": clip(str(e.get("msg", "")), 200), "type": str(e.get("type", ""))} for e in exc.errors()[:10]]
        detail = "; ".join(f"{'.'.join(e['loc']) or 'body'}: {e['msg']}" for e in errors) or "invalid request"
        return JSONResponse(status_code=422, content={"detail": clip(detail), "errors": errors})

    @app.exception_handler(DelrecError)
    async def _user_error(_: Request, exc: DelrecError) -> JSONResponse:
        # Same shape as a validation error: "field: message".
        msg = clip(" ".join(exc.message.split()))
        detail = clip(f"{exc.field}: {msg}" if exc.field else msg)
        errors = [{"loc": [exc.field] if exc.field else [], "msg": msg, "type": "value_error"}]
        return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})

    def item(i: int) -> Item:
        return Item(item=i, title=model.dataset.titles[i])

    @app.post("/recommend", response_model=RecommendResponse, responses=responses)
    def recommend(req: RecommendRequest) -> RecommendResponse:
        """Rank candidates for a history (titles or item indices) and return the top k."""
        history = model.resolve_history(req.history)
        unseen = model.dataset.n_items - len(set(history))
        if req.all_items and unseen > max_candidates:
            raise DelrecError(f"all_items would rank {unseen} items; this server ranks at most {max_candidates} "
                              "candidates per request", field="all_items")
        cands = _resolve_candidates(model, req.candidates)
        with lock:
            t0 = time.perf_counter()
            recs = model.recommend(history, k=req.k, candidates=cands, all_items=req.all_items, seed=req.seed)
            seconds = time.perf_counter() - t0
        source = "all" if req.all_items else "given" if cands is not None else "drawn"
        n = unseen if req.all_items else len(cands) if cands is not None else \
            min(max(model.settings.candidates, req.k), unseen)
        return RecommendResponse(recommendations=[Scored(item=r.item, title=r.title, score=r.score) for r in recs],
                                 history=[item(i) for i in history], candidates=source, n_candidates=n,
                                 seconds=round(seconds, 4))

    @app.post("/explain", response_model=ExplainResponse, responses=responses)
    def explain(req: ExplainRequest) -> ExplainResponse:
        """Leave-one-out influence of each history item on the top recommendation, beside the teacher's top-k."""
        history = model.resolve_history(req.history)
        cands = _resolve_candidates(model, req.candidates)
        with lock:
            t0 = time.perf_counter()
            ex = model.explain(history, k=req.k, candidates=cands, seed=req.seed)
            seconds = time.perf_counter() - t0
        return ExplainResponse(
            recommendations=[Scored(item=r.item, title=r.title, score=r.score) for r in ex.recommendations],
            influences=[InfluenceOut(item=x.item, title=x.title, position=x.position, influence=x.influence)
                        for x in ex.influences],
            teacher=ex.teacher,
            teacher_topk=[TeacherPickOut(item=t.item, title=t.title, rank=t.rank, in_candidates=t.in_candidates)
                          for t in ex.teacher_topk],
            history=[item(i) for i in ex.history], candidates=[item(i) for i in ex.candidates],
            seconds=round(seconds, 4))

    @app.get("/items", response_model=ItemsResponse)
    def items(q: str = Query("", max_length=200, description="part of a title (case-insensitive)"),
              limit: int = Query(20, ge=1, le=100)) -> ItemsResponse:
        """Titles containing ``q``, those starting with it first."""
        return ItemsResponse(items=[Item(item=i, title=t) for i, t in model.search(q, limit)])

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(status="ok", max_history=max_history, max_candidates=max_candidates, **model.info())

    app.head("/health", include_in_schema=False)(health)  # load balancers probe with HEAD

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
          max_history: int = 50, max_candidates: int = 100, log_level: str = "info") -> None:
    """Load a run folder and serve it with uvicorn until interrupted.

    CLI (``delrec serve RUN``): ``--host`` (default 127.0.0.1; use 0.0.0.0 to listen on every interface),
    ``--port`` (8000), ``--device``, ``--max-history`` (50), ``--max-candidates`` (100), ``--log-level`` (info).
    """
    import uvicorn

    if not 1 <= port <= 65535:
        raise DelrecError(f"must be 1..65535, got {port}", field="--port")
    if max_history < 1 or max_candidates < 1:
        raise DelrecError("must be at least 1", field="--max-history" if max_history < 1 else "--max-candidates")
    from delrec.cli import load_model

    model = load_model(Path(run_dir), device)
    app = create_app(model, max_history=max_history, max_candidates=max_candidates)
    # Idle keep-alive connections are closed after 5 s and at most 64 connections are served at once, so slow or
    # idle clients cannot pin the server's sockets; request heads over 64 KiB are refused by h11.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5, limit_concurrency=64,
                h11_max_incomplete_event_size=64 * 1024, timeout_graceful_shutdown=10)


def _resolve_candidates(model: DELRec, refs: list[int | str] | None) -> list[int] | None:
    """Given candidates → distinct item indices in the given order (None: let the model draw them)."""
    if refs is None:
        return None
    return list(dict.fromkeys(model.resolve(c, what=f"candidates[{i}]") for i, c in enumerate(refs)))


def _version() -> str:
    try:
        from delrec import __version__

        return str(__version__)
    except ImportError:
        return "0"

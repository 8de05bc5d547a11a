"""A small HTTP service and web page over a trained run: ``delrec serve RUN`` → http://127.0.0.1:8000/.

Endpoints (schemas at ``/openapi.json``, interactive docs at ``/docs``):
  POST /recommend   {history, k, candidates?, all_items?, seed?} → top-k with scores
  POST /explain     {history, k, candidates?, seed?} → top-k, leave-one-out influence of each history item,
                    the teacher's top-k
  GET  /items?q=    title search (autocomplete on the page)
  GET  /health      what is loaded
  GET  /            the page (static files in ``serve_static/``, no CDN, no build step)

One model on one device: inference is serialized with a lock (FastAPI runs the sync endpoints in a thread pool).
Bad input (too long a history, an unknown title, k out of range) is answered 422 with a one-line ``detail``.
"""

import threading
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from delrec.errors import DelrecError
from delrec.recommend import DELRec

STATIC = Path(__file__).parent / "serve_static"
ItemRef = StrictInt | str  # an item index (1..n_items) or a title (exact, case-insensitive or fuzzy)


class Item(BaseModel):
    item: int = Field(description="item index in the run's dataset (1..n_items)")
    title: str


class Scored(Item):
    score: float = Field(description="the LLM's length-normalised title log-likelihood; higher is better")


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
        k: int = Field(10, ge=1, le=max_candidates, description="number of recommendations")
        candidates: list[ItemRef] | None = Field(None, min_length=1, max_length=max_candidates,
                                                 description="items to rank; default: 20 drawn outside the history")
        all_items: bool = Field(False, description="rank every item outside the history (small catalogues only)")
        seed: int = Field(0, description="seed for the drawn candidate set")

    class ExplainRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        history: list[ItemRef] = Field(min_length=1, max_length=max_history)
        k: int = Field(10, ge=1, le=max_candidates)
        candidates: list[ItemRef] | None = Field(None, min_length=1, max_length=max_candidates)
        seed: int = 0

    app = FastAPI(title="DELRec", version=_version(),
                  description="Sequential recommendation with an LLM distilled from a conventional recommender.")
    responses: dict[int | str, dict[str, Any]] = {422: {"model": ErrorResponse, "description": "invalid input"}}

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": [str(p) for p in e.get("loc", ()) if p != "body"], "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(e['loc']) or 'body'}: {e['msg']}" for e in errors) or "invalid request"
        return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})

    @app.exception_handler(DelrecError)
    async def _user_error(_: Request, exc: DelrecError) -> JSONResponse:
        # Same shape as a validation error: "field: message".
        msg = " ".join(exc.message.split())
        detail = f"{exc.field}: {msg}" if exc.field else msg
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

    model = DELRec.from_pretrained(run_dir, device=device)
    app = create_app(model, max_history=max_history, max_candidates=max_candidates)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


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

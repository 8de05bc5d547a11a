"""The HTTP service: a real uvicorn server on loopback, called with httpx."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from delrec.recommend import DELRec
from delrec.serve import create_app
from tiny_run import build_tiny_run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """uvicorn in a daemon thread; `stop` asks it to exit and joins."""

    def __init__(self, app: object, port: int) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> DELRec:
    return DELRec.from_pretrained(build_tiny_run(tmp_path_factory.mktemp("serve")))


@pytest.fixture(scope="module")
def client(model: DELRec) -> Iterator[httpx.Client]:
    srv = ServerThread(create_app(model, max_history=12, max_candidates=30), free_port()).start()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        yield c
    srv.stop()


def test_health_and_items(client: httpx.Client, model: DELRec) -> None:
    h = client.get("/health")
    assert h.status_code == 200
    body = h.json()
    assert body["status"] == "ok" and body["n_items"] == 40 and body["teacher"] == "SASRec"
    assert body["max_history"] == 12 and body["max_candidates"] == 30 and body["soft_prompt"] is True
    title = model.dataset.titles[5]
    found = client.get("/items", params={"q": title[:6].upper()}).json()["items"]
    assert {"item": 5, "title": title} in found
    assert all(title[:6].lower() in f["title"].lower() for f in found)


def test_recommend(client: httpx.Client, model: DELRec) -> None:
    hist = [int(i) for i in model.dataset.sequences[0][:5]]
    r = client.post("/recommend", json={"history": [model.dataset.titles[hist[0]], *hist[1:]], "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    recs = body["recommendations"]
    assert len(recs) == 4 and body["candidates"] == "drawn" and body["n_candidates"] == 20
    assert [h["item"] for h in body["history"]] == hist
    assert not {x["item"] for x in recs} & set(hist)
    assert [x["score"] for x in recs] == sorted((x["score"] for x in recs), reverse=True)
    direct = model.recommend(hist, k=4)  # same seed, same candidates: the server answers what the library does
    assert [x["item"] for x in recs] == [d.item for d in direct]
    given = client.post("/recommend", json={"history": hist, "k": 3, "candidates": [30, 31, 32, 33]}).json()
    assert {x["item"] for x in given["recommendations"]} <= {30, 31, 32, 33} and given["candidates"] == "given"
    dup = client.post("/recommend", json={"history": hist, "k": 5, "candidates": [30, model.dataset.titles[30], 31]})
    assert dup.json()["n_candidates"] == 2 and len(dup.json()["recommendations"]) == 2  # the same item, twice
    long = list(range(1, 13))  # 28 items left: within max_candidates=30, so all_items is allowed
    every = client.post("/recommend", json={"history": long, "k": 30, "all_items": True}).json()
    assert every["candidates"] == "all" and every["n_candidates"] == 28
    assert sorted(x["item"] for x in every["recommendations"]) == list(range(13, 41))


def test_explain(client: httpx.Client, model: DELRec) -> None:
    hist = [int(i) for i in model.dataset.sequences[2][:6]]
    r = client.post("/explain", json={"history": hist, "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["recommendations"]) == 3 and len(body["influences"]) == 6
    assert {x["item"] for x in body["influences"]} == set(hist)
    assert body["teacher"] == "SASRec" and [t["rank"] for t in body["teacher_topk"]] == [1, 2, 3]
    ex = model.explain(hist, k=3)
    assert [x["influence"] for x in body["influences"]] == pytest.approx([x.influence for x in ex.influences])


@pytest.mark.parametrize(("payload", "fragment"), [
    ({"history": list(range(1, 14))}, "history: List should have at most 12 items"),
    ({"history": ["no such film at all"]}, "history[0]: no item titled 'no such film at all'"),
    ({"history": [1, 2], "k": 0}, "k: Input should be greater than or equal to 1"),
    ({"history": [1, 2], "k": 31}, "k: Input should be less than or equal to 30"),
    ({"history": []}, "history: List should have at least 1 item"),
    ({"history": [1, 99]}, "history[1]: item index 99 is out of range 1..40"),
    ({"history": [1], "candidates": list(range(2, 40))}, "candidates: List should have at most 30 items"),
    ({"history": [1], "all_items": True}, "all_items would rank 39 items"),
    ({"history": [1], "limit": 3}, "limit: Extra inputs are not permitted"),
    ({"k": 3}, "history: Field required"),
])
def test_bad_input_is_422_with_a_clear_message(client: httpx.Client, payload: dict, fragment: str) -> None:
    r = client.post("/recommend", json=payload)
    assert r.status_code == 422
    assert fragment in r.json()["detail"]
    r = client.post("/explain", json={k: v for k, v in payload.items() if k != "all_items"})
    assert r.status_code == 422 or "all_items" in payload


def test_openapi_documents_the_endpoints(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/recommend", "/explain", "/health", "/items"} <= set(spec["paths"])
    req = spec["components"]["schemas"]["RecommendRequest"]["properties"]
    assert req["history"]["maxItems"] == 12 and req["k"]["maximum"] == 30
    assert "422" in spec["paths"]["/recommend"]["post"]["responses"]
    assert "RecommendResponse" in spec["components"]["schemas"]


def test_page_and_static_files(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="recommend"' in page.text and "/static/app.js" in page.text
    assert "//cdn" not in page.text and "https://" not in page.text  # self-contained: no CDN
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200

"""The HTTP service under hostile or sloppy input: out-of-range seeds, loose types, huge bodies and fields are 4xx
with a short message, never a 500 and never the input echoed back."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from delrec.recommend import DELRec
from delrec.serve import MAX_TITLE, create_app
from test_serve import ServerThread, free_port
from tiny_run import build_tiny_run


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    model = DELRec.from_pretrained(build_tiny_run(tmp_path_factory.mktemp("serve_safety")))
    srv = ServerThread(create_app(model, max_history=12, max_candidates=30), free_port()).start()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        yield c
    srv.stop()


@pytest.mark.parametrize("endpoint", ["/recommend", "/explain"])
@pytest.mark.parametrize(("payload", "fragment"), [
    ({"history": [1, 2], "seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"history": [1, 2], "seed": 2**32}, "seed: Input should be less than or equal to 4294967295"),
    ({"history": [1, 2], "seed": "3"}, "seed: Input should be a valid integer"),
    ({"history": [1, 2], "k": True}, "k: Input should be a valid integer"),
    ({"history": [1, 2], "k": "10"}, "k: Input should be a valid integer"),
    ({"history": ["x" * (MAX_TITLE + 1)]}, "history.0: Value error, a title has at most 1000 characters"),
])
def test_bad_values_are_422(client: httpx.Client, endpoint: str, payload: dict, fragment: str) -> None:
    r = client.post(endpoint, json=payload)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["detail"], r.json()["detail"]
    assert "x" * 400 not in r.text  # the long title is not echoed


def test_all_items_must_be_a_boolean(client: httpx.Client) -> None:
    assert client.post("/recommend", json={"history": [1], "all_items": "yes"}).status_code == 422


def test_oversized_body_is_413_before_parsing(client: httpx.Client) -> None:
    body = b'{"history": [1], "pad": "' + b"y" * 3_000_000 + b'"}'
    r = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 413 and len(r.content) < 200

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams in
        yield b'{"history": [1], "pad": "'
        for _ in range(300):
            yield b"z" * 10_000
        yield b'"}'

    r = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_errors_never_echo_a_large_input(client: httpx.Client) -> None:
    long_key = "k" * 50_000
    r = client.post("/recommend", json={"history": [1], long_key: 1})
    assert r.status_code == 422 and len(r.text) < 2000
    r = client.post("/recommend", json={"history": ["q" * MAX_TITLE]})  # unknown title of allowed length
    assert r.status_code == 422 and len(r.json()["detail"]) <= 300


def test_health_allows_head_and_docs_are_offline(client: httpx.Client) -> None:
    assert client.head("/health").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 404  # Swagger UI would need a CDN


def test_serve_rejects_bad_port_before_loading(tmp_path_factory: pytest.TempPathFactory) -> None:
    from delrec.errors import DelrecError
    from delrec.serve import serve

    for kwargs in ({"port": 0}, {"port": 65536}, {"max_history": 0}, {"max_candidates": 0}):
        with pytest.raises(DelrecError):
            serve(tmp_path_factory.mktemp("nothing"), **kwargs)  # type: ignore[arg-type]

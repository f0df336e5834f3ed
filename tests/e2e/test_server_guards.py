"""Server hardening, live on 127.0.0.1: API key, body-size limit, queue limit, chat-template
failures and a failing engine. Every error keeps the OpenAI shape and the right status."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from kestrel import EngineConfig  # noqa: E402
from kestrel.entrypoints.openai.api_server import (  # noqa: E402
    ServerConfig,
    ServerThread,
    build_server,
)

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Like many real templates: refuses conversations it was not written for.
STRICT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def _start(path: str, server: ServerConfig, **engine):
    built = build_server(EngineConfig.from_kwargs(path, dtype="float32", **engine), server)
    thread = ServerThread(built.app).start()
    built.url = thread.url
    return built, thread


@pytest.fixture(scope="module")
def strict_model(tiny_model, tmp_path_factory) -> str:
    folder = Path(tmp_path_factory.mktemp("strict")) / "model"
    shutil.copytree(tiny_model("llama"), folder)
    (folder / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    return str(folder)


@pytest.fixture(scope="module")
def server(strict_model):
    # One running sequence at a time, so the others wait in the queue (limit 2).
    built, thread = _start(
        strict_model,
        ServerConfig(api_key=KEY, max_request_body_bytes=2048, max_queued_requests=2),
        max_num_seqs=1, max_model_len=256,
    )
    yield built
    thread.stop()
    built.engine.shutdown()


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def _idle(server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        busy, free, total = server.engine.call(
            lambda e: (e.has_unfinished(), e.kv.num_free_blocks, e.kv.num_blocks)).result()
        if not busy and free == total:
            return
        assert time.monotonic() < deadline, "engine did not go idle"
        time.sleep(0.02)


def test_api_key_required_everywhere_but_health(server):
    assert httpx.get(server.url + "/health").status_code == 200
    body = {"prompt": "x", "max_tokens": 1}
    for method, route in (("GET", "/v1/models"), ("GET", "/metrics"),
                          ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                          ("POST", "/tokenize"), ("GET", "/openapi.json")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            resp = httpx.request(method, server.url + route, json=body, headers=headers)
            assert _error(resp, 401)["type"] == "authentication_error"
            assert resp.headers["www-authenticate"] == "Bearer"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(prompt="x", max_tokens=2, model=server.served_model_names[0]
                                     ).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_body_limit(server):
    big = {"prompt": "x" * 4000, "max_tokens": 1}
    assert "max_request_body_bytes=2048" in _error(
        httpx.post(server.url + "/v1/completions", json=big, headers=AUTH), 413)["message"]

    def chunked():  # no Content-Length: the limit must hold while streaming the body in
        for _ in range(10):
            yield b" " * 512

    resp = httpx.post(server.url + "/v1/completions", content=chunked(),
                      headers={**AUTH, "content-type": "application/json"})
    _error(resp, 413)
    small = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                       headers=AUTH)
    assert small.status_code == 200


def test_queue_limit_answers_503_then_recovers(server):
    body = {"prompt": "long one", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.Client(headers=AUTH, timeout=30) as http:
        streams = []
        try:
            for _ in range(3):  # one runs, two wait
                cm = http.stream("POST", server.url + "/v1/completions", json=body)
                resp = cm.__enter__()
                assert resp.status_code == 200  # headers are sent once the request is queued
                streams.append(cm)
            deadline = time.monotonic() + 5
            while server.engine.stats().get("num_waiting", 0) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            error = _error(http.post(server.url + "/v1/completions",
                                     json={"prompt": "x", "max_tokens": 1}), 503)
            assert error["code"] == "queue_full" and "max_queued_requests=2" in error["message"]
        finally:
            for cm in streams:
                cm.__exit__(None, None, None)
        _idle(server)
        ok = http.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert ok.status_code == 200


def test_template_failures_and_bad_messages_are_400(server):
    url = server.url + "/v1/chat/completions"
    error = _error(httpx.post(url, headers=AUTH, json={
        "messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 1}), 400)
    assert "unknown role wizard" in error["message"] and error["param"] == "messages"
    error = _error(httpx.post(url, headers=AUTH, json={
        "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400)
    assert "only text parts" in error["message"]
    error = _error(httpx.post(url, headers=AUTH, json={
        "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs":
        {"tokenize": True}}), 400)
    assert "chat_template_kwargs" in error["message"]
    parts = httpx.post(url, headers=AUTH, json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "text", "text": "b"}]}],
        "max_tokens": 1})
    assert parts.status_code == 200
    _idle(server)


def test_engine_failure_fails_requests_and_health(tiny_model):
    built, thread = _start(tiny_model("llama"), ServerConfig(), max_model_len=256)
    try:
        url = built.url
        body = {"prompt": "doomed", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            calls = []

            def broken(*args, **kwargs):
                calls.append(threading.current_thread().name)
                raise RuntimeError("device fell over")

            built.engine.call(lambda e: setattr(e.executor, "execute", broken)).result()
            rest = [line for line in lines if line]
        assert calls == ["kestrel-engine"]
        assert rest[-1] == "data: [DONE]"
        assert '"error"' in rest[-2] and "device fell over" in rest[-2]
        assert _error(httpx.get(url + "/health"), 503)["code"] == "engine_dead"
        error = _error(httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=5), 503)
        assert error["code"] == "engine_dead"
    finally:
        thread.stop()
        built.engine.shutdown()

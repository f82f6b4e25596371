"""What a server must take and refuse at its door: OpenAI's nullable fields, strict types, the key, probes, 503s,
and a /metrics that never touches the model from the HTTP side."""

from __future__ import annotations

import json
import threading
import urllib.request

import openai
import pytest

from server_harness import MODEL_NAME, NO_THINKING, RunningServer, get, metric, post_raw, wait_until

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(built):
    s = RunningServer(built.store("qwen3_5_moe", 4), cache_gb=0.01, max_active=1, max_waiting=1)
    yield s
    s.close()


def chat(server, **body) -> tuple[int, dict]:
    return post_raw(server.url + "/v1/chat/completions", json.dumps({"model": MODEL_NAME, **body}).encode())


def test_null_optional_fields_mean_their_defaults(server):
    nulls = dict.fromkeys(["temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop", "seed",
                           "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user", "tools",
                           "tool_choice", "response_format", "parallel_tool_calls", "max_completion_tokens"])
    code, reply = chat(server, messages=HI, max_tokens=2, **nulls, **NO_THINKING)
    assert code == 200, reply
    assert reply["usage"]["completion_tokens"] >= 1
    code, reply = post_raw(server.url + "/v1/completions", json.dumps(
        {"model": MODEL_NAME, "prompt": "Once", "max_tokens": None, "echo": None, "suffix": None}).encode())
    assert code == 200 and reply["usage"]["completion_tokens"] <= 16  # null max_tokens: OpenAI's default, 16


@pytest.mark.parametrize("field, value", [("stream", "yes"), ("max_tokens", "5"), ("temperature", "0.5"),
                                          ("n", "1"), ("seed", 1.5), ("stream", 1), ("parallel_tool_calls", "no"),
                                          ("top_k", True), ("seed", 2**64)])
def test_loose_types_are_refused_not_coerced(server, field, value):
    code, reply = chat(server, messages=HI, **{field: value})
    assert code == 400 and reply["error"]["param"] == field, reply


def test_requests_that_used_to_be_500s(server):
    for key in ("tools", "messages", "add_generation_prompt", "tokenize"):
        code, reply = chat(server, messages=HI, chat_template_kwargs={key: 1})
        assert code == 400 and key in reply["error"]["message"], reply
    lone = b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}' % MODEL_NAME.encode()
    code, reply = post_raw(server.url + "/v1/chat/completions", lone)
    assert code == 400 and "lone surrogate" in reply["error"]["message"], reply
    code, reply = post_raw(server.url + "/v1/completions", json.dumps(
        {"model": MODEL_NAME, "prompt": ["one", "two"]}).encode())
    assert code == 400 and "batch prompts" in reply["error"]["message"], reply


def test_empty_api_key_means_none_and_bearer_is_case_insensitive(built):
    s = RunningServer(built.store("qwen3_5_moe", 4), api_key="", cache_gb=0.01)
    try:
        assert [m.id for m in s.client("anything").models.list()] == [MODEL_NAME]
    finally:
        s.close()
    s = RunningServer(built.store("qwen3_5_moe", 4), api_key="sesame", cache_gb=0.01)
    try:
        for header, status in (("bearer sesame", 200), ("BEARER  sesame ", 200), ("Basic sesame", 401),
                               ("Bearer sesam", 401), ("sesame", 401)):
            req = urllib.request.Request(s.url + "/v1/models", headers={"Authorization": header})
            try:
                code = urllib.request.urlopen(req, timeout=30).status
            except urllib.error.HTTPError as e:
                code = e.code
            assert code == status, header
    finally:
        s.close()


def test_health_answers_head(server):
    req = urllib.request.Request(server.url + "/health", method="HEAD")
    assert urllib.request.urlopen(req, timeout=30).status == 200


def test_503_says_when_to_retry(server, monkeypatch):
    # the running request is held inside the model (a tiny random model may end any stream at its next token, which
    # made this test a race against the queue), until the queue is full and the refusal is seen
    started, release, forward = threading.Event(), threading.Event(), server.model.forward

    def held_forward(*args, **kwargs):
        started.set()
        release.wait(120)
        return forward(*args, **kwargs)

    monkeypatch.setattr(server.model, "forward", held_forward)
    client = server.client()
    ask = lambda content: client.chat.completions.create(  # noqa: E731
        model=MODEL_NAME, messages=[{"role": "user", "content": content}], max_tokens=2, extra_body=NO_THINKING)
    running, queued = threading.Thread(target=ask, args=("a",)), threading.Thread(target=ask, args=("b",))
    try:
        running.start()
        assert started.wait(60)  # the worker is inside the first request
        queued.start()
        wait_until(lambda: metric(server, "flashmoe_queue_depth") == 1)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model=MODEL_NAME, messages=HI, max_tokens=2)
        assert info.value.status_code == 503 and int(info.value.response.headers["retry-after"]) >= 1
    finally:
        release.set()
        running.join(timeout=120)
        queued.join(timeout=120)


def test_metrics_never_touch_the_model_from_the_http_side(server, monkeypatch):
    model_type = type(server.model)
    real_stats = model_type.stats
    readers = set()

    def stats(self):
        readers.add(threading.current_thread().name)
        return real_stats.fget(self)

    monkeypatch.setattr(model_type, "stats", property(stats))
    code, _ = chat(server, messages=[{"role": "user", "content": "Tell me more"}], max_tokens=4, **NO_THINKING)
    assert code == 200
    wait_until(lambda: readers)  # the worker copies the stats out when it is idle again
    for _ in range(3):
        assert get(server.url + "/metrics")[0] == 200
    assert readers == {"flashmoe-worker"}

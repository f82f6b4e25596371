"""A real flashmoe server on a random loopback port, in a thread, for tests to drive with the openai client."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import uvicorn

import flashmoe
from flashmoe.server import ServedModel, create_app

MODEL_NAME = "tiny-moe"
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


class RunningServer:
    def __init__(self, store, api_key: str | None = None, max_active: int = 2, max_waiting: int = 64,
                 batch_steps: bool | None = None, **load_options):
        self.model = flashmoe.load(store, **load_options)
        self.served = ServedModel(self.model, MODEL_NAME, max_active=max_active, max_waiting=max_waiting,
                                  batch_steps=batch_steps)
        app = create_app(self.served, api_key=api_key)
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self, api_key: str = "none", **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kwargs)

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self.model.close()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def post_raw(url: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def metric(server, name: str) -> float:
    _, text = get(server.url + "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)

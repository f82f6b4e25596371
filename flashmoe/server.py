"""An OpenAI-compatible HTTP API over one model: /v1/models, /v1/chat/completions, /v1/completions,
streamed (server-sent events) or not, Anthropic's /v1/messages (messages_api.py), plus /health and /metrics.

Per request: render the chat with the checkpoint's template, compile a grammar when the output must be JSON
or a tool call, queue a job on the scheduler (scheduler.py), and turn its tokens into text (textstream.py),
then into reasoning, content and tool calls (chat.py) as OpenAI's response shapes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import ChatFormat, OutputParser, ParsedDelta, format_markers
from .errors import FlashMoeError
from .grammar import Grammars, reasoning_mode
from .metrics import metrics_response
from . import messages_api
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest
from .scheduler import DEFAULT_PREFILL_CHUNK, Finished, QueueFull, SamplingParams, Scheduler
from .harmony import HarmonyParser
from .textstream import IncrementalDecoder, StopStrings

MESSAGES_PATH = "/v1/messages"  # Anthropic's API: its routes answer errors in its shape
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there
RETRY_AFTER_S = 1  # a 503's advice: a queue slot frees when any request ends, typically within a second or two


class ServedModel:
    """The model and what serving it needs: its name, chat format, grammar compiler and the scheduler."""

    def __init__(self, model, name: str, max_active: int = 4, max_waiting: int = 64,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, batch_steps: bool | None = None):
        self.model, self.name = model, name
        model.graph_per_sequence = False  # requests come and go: a lone one steps through the batch graphs too
        self.chat = ChatFormat(model.tokenizer)
        self.context_length = model.config.max_position_embeddings
        self.scheduler = Scheduler(model, max_active, max_waiting, prefill_chunk, batch_steps)
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()

    @property
    def grammars(self) -> Grammars:
        with self._grammars_lock:  # requests prepare in a thread pool; the vocabulary is scanned once
            if self._grammars is None:
                self._grammars = Grammars(self.model.tokenizer, self.model.config.vocab_size,
                                          self.model.eos_token_ids)
            return self._grammars


def _error_response(error: ApiError, request: Request | None = None) -> JSONResponse:
    """OpenAI's error shape, or Anthropic's on its routes."""
    anthropic = request is not None and request.url.path.startswith(MESSAGES_PATH)
    body = messages_api.error_body(error) if anthropic else error.body()
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    return ApiError(400, f"{param}: {message}" if param else message, param=param)


def create_app(served: ServedModel, api_key: str | None = None) -> FastAPI:
    """api_key None or "": no key needed."""
    api_key = api_key or None
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(served.scheduler.stop)

    app = FastAPI(title="flashmoe", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error_response(_validation_error(exc), request)

    @app.exception_handler(FlashMoeError)
    async def _bad_input(request: Request, exc: FlashMoeError):
        return _error_response(ApiError(400, str(exc)), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(ApiError(exc.status_code, str(exc.detail), type=kind), request)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"),
                               request)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer":  # Anthropic's clients send x-api-key
            given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "incorrect or missing API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
                           code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != served.name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {served.name!r}",
                           param="model", code="model_not_found")

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        s = served.scheduler.stats
        return {"status": "ok", "model": served.name, "waiting": s.waiting, "active": s.active}

    @app.get("/metrics")
    async def metrics():
        return metrics_response(served.scheduler)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def list_models():
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(check_key)])
    async def get_model(name: str):
        check_model(name)
        return _model_card(served)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        prompt_ids, parser, constraint, keep_at = await run_in_threadpool(_prepare_chat, served, body)
        return await _respond(served, request, body, prompt_ids, parser, constraint, chat=True, keep_at=keep_at)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        if isinstance(body.prompt, str):
            prompt_ids = list(served.model.tokenizer(body.prompt)["input_ids"])
        else:
            prompt_ids = body.prompt
            vocab = served.model.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt_ids):
                raise ApiError(400, f"prompt: token ids must be in 0..{vocab - 1}", param="prompt")
        _check_length(served, prompt_ids, body.token_limit(), "prompt")
        return await _respond(served, request, body, prompt_ids, None, None, chat=False)

    @app.post(MESSAGES_PATH, dependencies=[Depends(check_key)])
    async def messages(body: messages_api.MessagesRequest, request: Request):
        check_model(body.model)
        chat = messages_api.to_chat_request(body)
        prompt_ids, parser, constraint, keep_at = await run_in_threadpool(_prepare_chat, served, chat)
        job = _submit(served, chat, prompt_ids, constraint, keep_at)
        meta = {"id": f"msg_{uuid.uuid4().hex}", "model": served.name}
        pieces = _pieces(served, job, chat.stop_strings(), parser)
        if body.stream:
            return StreamingResponse(_cancel_on_exit(job, messages_api.events(meta, len(prompt_ids), pieces,
                                                                              _raise_if_failed)),
                                     media_type="text/event-stream")
        gathered = await _gather(request, job, pieces)
        if isinstance(gathered, Response):
            return gathered
        reasoning, text, calls, outcome = gathered
        return messages_api.message(meta, reasoning, text, calls, outcome)

    @app.post(MESSAGES_PATH + "/count_tokens", dependencies=[Depends(check_key)])
    async def count_tokens(body: messages_api.CountTokensRequest):
        check_model(body.model)
        prompt_ids, *_ = await run_in_threadpool(_prepare_chat, served, messages_api.to_chat_request(body))
        return {"input_tokens": len(prompt_ids)}

    return app


async def _cancel_on_exit(job, stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream whose client went away cancels its job."""
    finished = False
    try:
        async for chunk in stream:
            yield chunk
        finished = True
    finally:
        if not finished:
            job.cancel("client disconnected")


def _model_card(served: ServedModel) -> dict:
    return {"id": served.name, "object": "model", "created": 0, "owned_by": "flashmoe",
            "max_model_len": served.context_length}


def _prepare_chat(served: ServedModel, body: ChatCompletionRequest):
    """Prompt ids, output parser and grammar (or None) for a chat request; ApiError when it cannot be served."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice
    choice = choice.model_dump() if hasattr(choice, "model_dump") else (choice or "auto")
    names = [t["function"]["name"] for t in tools]
    if choice != "auto" and choice != "none" and not tools:
        raise ApiError(400, "tool_choice needs tools", param="tool_choice")
    if isinstance(choice, dict) and choice["function"]["name"] not in names:
        raise ApiError(400, f"tool_choice names {choice['function']['name']!r}, which is not among the tools",
                       param="tool_choice")
    if choice == "none":
        tools = []  # the model is not told about tools it may not call
    fmt = body.response_format
    wants_json = fmt is not None and fmt.type != "text"
    if wants_json and tools:
        raise ApiError(400, "response_format and tools cannot be combined; send tool_choice 'none' or drop "
                            "response_format", param="response_format")
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
        raise ApiError(400, "response_format json_schema needs a json_schema object", param="response_format")

    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    prompt = served.chat.render(messages, tools, **(body.chat_template_kwargs or {}))
    prompt_ids = served.chat.encode(prompt)
    _check_length(served, prompt_ids, body.token_limit(), "messages")
    # where the prefix cache keeps the state for the next turn, besides the prompt's and reply's ends
    keep_at = served.chat.branch_points(prompt_ids, messages, tools, **(body.chat_template_kwargs or {})) \
        if served.model.prefix_cache is not None else ()

    reasoning = reasoning_mode(prompt, served.chat.thinks)
    constraint = None
    if wants_json:
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
        constraint = served.grammars.json(schema, reasoning)
    elif tools and served.chat.harmony and choice == "auto":
        pass  # harmony (GPT-OSS): free text, its calls parsed; a forced call is constrained below
    elif tools:
        constraint = served.grammars.tool_calls(served.chat.tool_format, tools, choice, reasoning,
                                                body.parallel_tool_calls)
    if served.chat.harmony:
        return prompt_ids, HarmonyParser(), constraint, keep_at
    parser = OutputParser(served.chat.tool_format if tools else None, tools,
                          prompt_opened_think=reasoning == "enabled", parse_reasoning=served.chat.thinks)
    return prompt_ids, parser, constraint, keep_at


def _check_length(served: ServedModel, prompt_ids: list[int], max_tokens: int | None, param: str) -> None:
    n, limit = len(prompt_ids), served.context_length
    if n >= limit or (max_tokens is not None and n + max_tokens > limit):
        asked = f" and {max_tokens} to generate" if max_tokens else ""
        raise ApiError(400, f"this model's context is {limit} tokens; the request has {n} prompt tokens{asked}",
                       param=param, code="context_length_exceeded")
    if n == 0:
        raise ApiError(400, "the prompt is empty", param=param)


def _submit(served: ServedModel, body, prompt_ids: list[int], constraint, keep_at: tuple[int, ...] = ()):
    params = SamplingParams(max_tokens=body.token_limit() or served.context_length - len(prompt_ids),
                            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed)
    try:
        return served.scheduler.submit(prompt_ids, params, constraint, keep_at)
    except QueueFull as exc:
        raise ApiError(503, str(exc), type="server_error", code="server_busy",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from exc


async def _respond(served: ServedModel, request: Request, body, prompt_ids: list[int], parser: OutputParser | None,
                   constraint, chat: bool, keep_at: tuple[int, ...] = ()):
    job = _submit(served, body, prompt_ids, constraint, keep_at)
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": served.name}
    pieces = _pieces(served, job, body.stop_strings(), parser)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_cancel_on_exit(job, _sse(pieces, meta, chat, include_usage)),
                                 media_type="text/event-stream")
    return await _collect(request, job, pieces, meta, chat)


class _Outcome:
    def __init__(self, prompt_tokens: int):
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self.tool_calls = 0
        self.finished: Finished | None = None
        self.stop_sequence: str | None = None  # the stop string that ended the text

    def finish_reason(self) -> str:
        reason = self.finished.reason
        return "tool_calls" if reason == "stop" and self.tool_calls else reason

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


async def _pieces(served: ServedModel, job, stops: list[str], parser: OutputParser | None
                  ) -> AsyncIterator[tuple[ParsedDelta, _Outcome]]:
    """The job's output as parsed deltas; the last one comes with outcome.finished set."""
    outcome = _Outcome(len(job.prompt_ids))
    markers = () if parser is None else format_markers(served.chat.tool_format, served.chat.harmony)
    tok = served.model.tokenizer
    # an end-of-turn token that is markup (harmony's <|call|> and <|return|>) stays in the text its parser reads
    ends = {i for i in served.model.eos_token_ids if tok.convert_ids_to_tokens(i) not in markers}
    decoder = IncrementalDecoder(tok, skip_token_ids=ends, markers=markers)
    stop = StopStrings(stops)
    feed = parser.feed if parser else (lambda text: ParsedDelta(content=text))
    close = parser.close if parser else ParsedDelta
    async for event in job.events():
        finished = None
        if isinstance(event, Finished):
            finished = event
            delta = _merge(feed(stop.feed(decoder.flush()) + stop.close()), close())
        else:
            outcome.completion_tokens += 1
            delta = feed(stop.feed(decoder.add(event)))
            if stop.stopped:
                job.cancel(reason=None)  # a normal end: the text reached a stop string
                finished = Finished("stop")
                outcome.stop_sequence = stop.matched
                delta = _merge(delta, close())
        outcome.tool_calls += len(delta.tool_calls)
        outcome.finished = finished
        if delta or finished:
            yield delta, outcome
        if finished:
            return


def _merge(a: ParsedDelta, b: ParsedDelta) -> ParsedDelta:
    return ParsedDelta(a.reasoning + b.reasoning, a.content + b.content, a.tool_calls + b.tool_calls)


def _raise_if_failed(outcome: _Outcome) -> None:
    f = outcome.finished
    if f.reason == "error" or (f.reason == "cancelled" and f.error):
        raise ApiError(500, f"generation failed: {f.error}", type="server_error")


async def _collect(request: Request, job, pieces, meta: dict, chat: bool) -> dict:
    """A non-streamed OpenAI response."""
    gathered = await _gather(request, job, pieces)
    if isinstance(gathered, Response):
        return gathered
    reasoning, text, calls, outcome = gathered
    if not chat:
        choice = {"index": 0, "text": text, "finish_reason": outcome.finish_reason(), "logprobs": None}
        return {**meta, "object": "text_completion", "choices": [choice], "usage": outcome.usage()}
    message = {"role": "assistant", "content": text or (None if calls else "")}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [_tool_call_json(c) for c in calls]
    choice = {"index": 0, "message": message, "finish_reason": outcome.finish_reason(), "logprobs": None}
    return {**meta, "object": "chat.completion", "choices": [choice], "usage": outcome.usage()}


async def _gather(request: Request, job, pieces):
    """(reasoning, content, tool calls, outcome) of a whole generation, or a 499 if the client went away (the job
    is then cancelled)."""
    reasoning, content, calls = [], [], []
    outcome = None

    async def gather():
        nonlocal outcome
        async for delta, outcome in pieces:
            reasoning.append(delta.reasoning)
            content.append(delta.content)
            calls.extend(delta.tool_calls)

    task = asyncio.ensure_future(gather())
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            job.cancel("client disconnected")
            task.cancel()
            return Response(status_code=499)
    task.result()
    _raise_if_failed(outcome)
    return "".join(reasoning), "".join(content), calls, outcome


def _tool_call_json(call, index: int | None = None) -> dict:
    out = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return out if index is None else {"index": index, **out}


async def _sse(pieces, meta: dict, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events; the final chunk carries finish_reason and usage, then (if asked) a usage-only chunk."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list, **extra) -> str:
        return f"data: {json.dumps({**meta, 'object': kind, 'choices': choices, **extra})}\n\n"

    def choice(delta: dict | None = None, text: str = "", finish: str | None = None) -> dict:
        if chat:
            return {"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None}
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    calls_sent = 0
    if chat:
        yield event([choice({"role": "assistant", "content": ""})])
    async for delta, outcome in pieces:
        if chat:
            d = {}
            if delta.reasoning:
                d["reasoning_content"] = delta.reasoning
            if delta.content:
                d["content"] = delta.content
            if delta.tool_calls:
                d["tool_calls"] = [_tool_call_json(c, calls_sent + i) for i, c in enumerate(delta.tool_calls)]
                calls_sent += len(delta.tool_calls)
            if d:
                yield event([choice(d)])
        elif delta.content:
            yield event([choice(text=delta.content)])
    try:
        _raise_if_failed(outcome)
    except ApiError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
        return
    yield event([choice(finish=outcome.finish_reason())], usage=outcome.usage())
    if include_usage:
        yield event([], usage=outcome.usage())
    yield "data: [DONE]\n\n"

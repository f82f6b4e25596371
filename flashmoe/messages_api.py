"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) over the model the OpenAI API serves,
so Claude Code and the official `anthropic` client work unchanged.

A request is translated into the chat request the OpenAI path already serves (system prompt, text / tool_use /
tool_result blocks, tools with input_schema, tool_choice auto / any / tool / none, stop_sequences), rendered by the
checkpoint's template and constrained by the same grammars; the output comes back as Anthropic's content blocks
(thinking, text, tool_use), stop reasons and, streamed, its documented event sequence. Errors take Anthropic's shape.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .protocol import ApiError, ChatCompletionRequest

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 499: "request_cancelled", 503: "overloaded_error"}


def error_body(error: ApiError) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(error.status, "api_error"), "message": error.message}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class MessageParam(_Body):
    role: Literal["user", "assistant"]
    content: str | list[dict]


class ToolParam(_Body):
    name: str
    description: str | None = None
    input_schema: dict = Field(default_factory=lambda: {"type": "object"})


class MessagesRequest(_Body):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[dict] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: dict | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    thinking: dict | None = None  # {"type": "enabled" | "disabled"}: the template's own switch, where it has one


class CountTokensRequest(_Body):
    model: str
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[dict] | None = None
    tools: list[ToolParam] | None = None
    thinking: dict | None = None


def _text_of(blocks, where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    parts = []
    for i, b in enumerate(blocks):
        if b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise ApiError(400, f"{where}.{i}: expected a text block", param=f"{where}.{i}")
        parts.append(b["text"])
    return "".join(parts)


def _chat_messages(body) -> list[dict]:
    """Anthropic's turns as the OpenAI chat messages the template renders: tool_use blocks become the assistant's
    tool_calls, tool_result blocks tool messages (in order, before the user's text)."""
    out = [{"role": "system", "content": _text_of(body.system, "system")}] if body.system else []
    for m_i, m in enumerate(body.messages):
        blocks = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else m.content
        text, calls = [], []
        for b_i, b in enumerate(blocks):
            where, kind = f"messages.{m_i}.content.{b_i}", b.get("type")
            if kind == "text" and isinstance(b.get("text"), str):
                text.append(b["text"])
            elif kind == "thinking" and m.role == "assistant":
                continue  # earlier reasoning: the templates drop it from history
            elif kind == "tool_use" and m.role == "assistant" and isinstance(b.get("name"), str):
                calls.append({"id": str(b.get("id") or f"toolu_{uuid.uuid4().hex[:24]}"), "type": "function",
                              "function": {"name": b["name"], "arguments": json.dumps(b.get("input") or {})}})
            elif kind == "tool_result" and m.role == "user":
                content = b.get("content", "")
                result = content if isinstance(content, str) else _text_of(content, where + ".content")
                out.append({"role": "tool", "tool_call_id": str(b.get("tool_use_id", "")), "content": result})
            else:
                raise ApiError(400, f"{where}: a {kind!r} block is not supported in a {m.role} turn "
                                    "(text, tool_use from the assistant, tool_result from the user)", param=where)
        if m.role == "assistant":
            out.append({"role": "assistant", "content": "".join(text), **({"tool_calls": calls} if calls else {})})
        elif text or not any(b.get("type") == "tool_result" for b in blocks):
            out.append({"role": "user", "content": "".join(text)})
    return out


def _tool_choice(choice: dict | None):
    kind = (choice or {}).get("type", "auto")
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise ApiError(400, "tool_choice: type 'tool' needs a name", param="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind not in ("auto", "any", "none"):
        raise ApiError(400, f"tool_choice: type {kind!r} is not one of auto, any, tool, none", param="tool_choice")
    return {"auto": "auto", "any": "required", "none": "none"}[kind]


def to_chat_request(body) -> ChatCompletionRequest:
    """The OpenAI chat request that serves an Anthropic one (CountTokensRequest too)."""
    chat = {"model": body.model, "messages": _chat_messages(body)}
    if body.tools:
        chat["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                           "parameters": t.input_schema}} for t in body.tools]
    if isinstance(body, MessagesRequest):
        chat.update(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                    stream=body.stream, stop=body.stop_sequences or None)
        if body.tools or body.tool_choice is not None:  # a tool_choice without tools is refused as OpenAI's is
            chat["tool_choice"] = _tool_choice(body.tool_choice)
            # Anthropic's parallel tool use is on unless disable_parallel_tool_use says otherwise
            chat["parallel_tool_calls"] = not (body.tool_choice or {}).get("disable_parallel_tool_use", False)
    if body.thinking is not None:
        chat["chat_template_kwargs"] = {"enable_thinking": body.thinking.get("type") == "enabled"}
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in chat.items() if v is not None})
    except ValueError as exc:  # pydantic's ValidationError: one line
        first = exc.errors()[0] if hasattr(exc, "errors") else {"msg": str(exc), "loc": ()}
        raise ApiError(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def stop_reason(outcome) -> str:
    if outcome.finished.reason == "length":
        return "max_tokens"
    if outcome.tool_calls:
        return "tool_use"
    return "stop_sequence" if outcome.stop_sequence else "end_turn"


def _usage(outcome) -> dict:
    return {"input_tokens": outcome.prompt_tokens, "output_tokens": outcome.completion_tokens}


def _tool_use(call) -> dict:
    try:
        arguments = json.loads(call.arguments or "{}")
    except ValueError:  # an unconstrained call that is not JSON: handed over as text
        arguments = {"_raw": call.arguments}
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": arguments}


def message(meta: dict, reasoning: str, text: str, calls: list, outcome) -> dict:
    content = [{"type": "thinking", "thinking": reasoning, "signature": ""}] if reasoning else []
    if text or not calls:
        content.append({"type": "text", "text": text})
    content += [_tool_use(c) for c in calls]
    return {**meta, "type": "message", "role": "assistant", "content": content, "stop_reason": stop_reason(outcome),
            "stop_sequence": outcome.stop_sequence, "usage": _usage(outcome)}


async def events(meta: dict, prompt_tokens: int, pieces, raise_if_failed) -> AsyncIterator[str]:
    """Anthropic's stream: message_start, then per block content_block_start / _delta / _stop, message_delta with
    the stop reason and usage, message_stop."""
    def event(kind: str, **data) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"

    start = {**meta, "type": "message", "role": "assistant", "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}
    yield event("message_start", message=start)
    index, open_kind, outcome = -1, None, None

    def switch(kind: str, block: dict):
        nonlocal index, open_kind
        out = [event("content_block_stop", index=index)] if open_kind is not None else []
        index, open_kind = index + 1, kind
        return out + [event("content_block_start", index=index, content_block=block)]

    async for delta, outcome in pieces:
        if delta.reasoning:
            if open_kind != "thinking":
                for e in switch("thinking", {"type": "thinking", "thinking": "", "signature": ""}):
                    yield e
            yield event("content_block_delta", index=index, delta={"type": "thinking_delta", "thinking": delta.reasoning})
        if delta.content:
            if open_kind != "text":
                for e in switch("text", {"type": "text", "text": ""}):
                    yield e
            yield event("content_block_delta", index=index, delta={"type": "text_delta", "text": delta.content})
        for call in delta.tool_calls:
            for e in switch("tool_use", {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}):
                yield e
            yield event("content_block_delta", index=index,
                        delta={"type": "input_json_delta", "partial_json": call.arguments or "{}"})
    try:
        raise_if_failed(outcome)
    except ApiError as exc:
        yield f"event: error\ndata: {json.dumps(error_body(exc))}\n\n"
        return
    if open_kind is None:  # nothing came: an empty text block, as Anthropic sends
        for e in switch("text", {"type": "text", "text": ""}):
            yield e
    yield event("content_block_stop", index=index)
    yield event("message_delta", delta={"stop_reason": stop_reason(outcome), "stop_sequence": outcome.stop_sequence},
                usage={"output_tokens": outcome.completion_tokens})
    yield event("message_stop")

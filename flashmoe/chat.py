"""Chat: render messages with the checkpoint's own template, and split the model's output into reasoning,
content and tool calls, also while it streams. The tool-call formats, one module each, are in tool_formats/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from . import tool_formats
from .errors import FlashMoeError
from .tool_formats import harmony as _harmony
from .tool_formats.common import THINK_BEGIN, THINK_END, ToolCall, argument_schemas, raw_arguments, writes_raw
from .tool_formats.qwen_json import CALL_BEGIN, CALL_END  # what a template without tools still reads as markup

__all__ = ["ChatFormat", "OutputParser", "ParsedDelta", "StreamParser", "ToolCall", "THINK_BEGIN", "THINK_END",
           "argument_schemas", "detect_tool_format", "format_markers", "is_harmony", "writes_raw"]


def is_harmony(template: str | None) -> bool:
    """Whether replies are harmony messages (GPT-OSS): channels, not <think> and <tool_call>."""
    return bool(template) and _harmony.detect(template)


def format_markers(tool_format: str | None, harmony: bool = False) -> tuple[str, ...]:
    """The markup the output parsers read, for IncrementalDecoder to keep where the tokenizer makes it special."""
    return tool_formats.markers("harmony" if harmony else tool_format)


def detect_tool_format(template: str | None) -> str | None:
    """The tool-call format a template writes (tool_formats/: "json", "xml", "glm", "deepseek", "kimi", "minimax",
    "mistral", "harmony"), or None (it does not take tools)."""
    return tool_formats.detect(template)


def _text_of(content, role: str) -> str:
    """OpenAI content: a string, null, or a list of parts of which we take the text ones."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise FlashMoeError(f"{role} message: content parts of type {part.get('type')!r} are not supported "
                                "(text only)")
        texts.append(part.get("text", ""))
    return "".join(texts)


def _template_message(message: dict) -> dict:
    """An OpenAI message as the Qwen templates read it: text content, tool-call arguments as objects."""
    role = "system" if message["role"] == "developer" else message["role"]  # OpenAI's newer name for system
    out = {"role": role, "content": _text_of(message.get("content"), role)}
    if message.get("tool_calls"):
        calls = []
        for call in message["tool_calls"]:
            fn = dict(call["function"])
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"]) if fn["arguments"].strip() else {}
                except json.JSONDecodeError as exc:
                    raise FlashMoeError(f"tool call {fn.get('name')!r}: arguments are not valid JSON ({exc})") from exc
            calls.append({"id": call.get("id"), "type": "function", "function": fn})
        out["tool_calls"] = calls
    for key in ("tool_call_id", "name", "reasoning_content"):
        if message.get(key) is not None:
            out[key] = message[key]
    return out


class ChatFormat:
    """A checkpoint's chat template and what it implies: the tool-call format and whether it thinks."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = getattr(tokenizer, "chat_template", None)
        self.tool_format = detect_tool_format(self.template)
        self.harmony = is_harmony(self.template)
        self.thinks = bool(self.template) and THINK_BEGIN in self.template and not self.harmony

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               **template_kwargs) -> str:
        if not self.template:
            raise FlashMoeError("this model has no chat template; use /v1/completions with a plain prompt")
        if tools and self.tool_format is None:
            raise FlashMoeError("this model's chat template does not take tools")
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template([_template_message(m) for m in messages], tools=tools or None,
                                                      add_generation_prompt=add_generation_prompt, tokenize=False,
                                                      **template_kwargs)
        except TemplateError as exc:
            raise FlashMoeError(f"the chat template rejected these messages: {exc}") from exc

    def branch_points(self, prompt_ids: list[int], messages: list[dict], tools: list[dict] | None = None,
                      **template_kwargs) -> tuple[int, ...]:
        """Where in a chat prompt the next turn will branch, for Model.generate's keep_at: the end of its messages,
        before the reply's header (a thinking template's empty think block included), since the next turn re-renders
        the reply, often differently (its thinking dropped). () where that rendering is not a prefix of the prompt's."""
        try:
            history = self.encode(self.render(messages, tools, add_generation_prompt=False, **template_kwargs))
        except FlashMoeError:
            return ()
        return (len(history),) if 0 < len(history) < len(prompt_ids) and prompt_ids[: len(history)] == history else ()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))


@dataclass
class ParsedDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker` (held back while streaming)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class StreamParser:
    """What the output parsers share (OutputParser here, harmony.HarmonyParser): text arrives in pieces, `_step`
    consumes what can be decided of the pending text until it returns False, and content never starts with
    whitespace."""

    def __init__(self):
        self._pending = ""
        self._content_started = False

    def feed(self, text: str) -> ParsedDelta:
        self._pending = self._take(self._pending + text)
        delta = ParsedDelta()
        while self._step(delta):
            pass
        return delta

    def _take(self, pending: str) -> str:
        """The pending text as the parser reads it."""
        return pending

    def _step(self, delta: ParsedDelta) -> bool:
        raise NotImplementedError

    def _emit_content(self, delta: ParsedDelta, text: str) -> None:
        if not self._content_started:
            text = text.lstrip()
        if text:
            delta.content += text
            self._content_started = True


class OutputParser(StreamParser):
    """Splits generated text into reasoning, content and tool calls as it arrives.

    Text that may be the start of a marker is held back until it is decided; a tool call is reported whole
    when its closing tag arrives; content never starts or ends with whitespace.
    """

    def __init__(self, tool_format: str | None = None, tools: list[dict] | None = None,
                 prompt_opened_think: bool = False, parse_reasoning: bool = True):
        super().__init__()
        self.tool_format = tool_format
        self._format = tool_formats.get(tool_format) if tool_format else None
        self._call_begin, self._call_end, self._drop = ((self._format.CALL_BEGIN, self._format.CALL_END,
                                                         self._format.SECTION) if self._format else (CALL_BEGIN, CALL_END, ()))
        self._raw_arguments = raw_arguments(tools)
        self._state = "reasoning" if prompt_opened_think else "content"
        self._parse_reasoning = parse_reasoning
        self._at_start = True

    def _take(self, pending: str) -> str:
        for marker in self._drop:  # markup around the calls (each marker is one token: it arrives whole)
            pending = pending.replace(marker, "")
        return pending

    def close(self) -> ParsedDelta:
        delta = ParsedDelta()
        rest, self._pending = self._pending, ""
        if self._state == "reasoning":
            delta.reasoning = rest
        elif self._state == "tool" and self._call_end is None:  # calls that run to the end of the text (Mistral's)
            calls = self._format.parse(rest, self._raw_arguments)
            if calls is None:
                self._emit_content(delta, self._call_begin + rest.rstrip())
            else:
                delta.tool_calls.extend(calls)
        else:  # an unfinished tool call is shown as the text it is
            self._emit_content(delta, rest.rstrip())
        return delta

    def _step(self, delta: ParsedDelta) -> bool:
        """Consume what can be decided of the pending text; True if the state changed and there may be more."""
        p = self._pending
        if self._state == "reasoning":
            i = p.find(THINK_END)
            if i < 0:
                keep = _partial_suffix(p, THINK_END)
                delta.reasoning += p[:len(p) - keep]
                self._pending = p[len(p) - keep:]
                return False
            delta.reasoning += p[:i]
            self._pending, self._state = p[i + len(THINK_END):], "content"
            return True
        if self._state == "content":
            if self._at_start and self._parse_reasoning:
                stripped = p.lstrip()
                if THINK_BEGIN.startswith(stripped) and len(stripped) < len(THINK_BEGIN):
                    return False  # may still become <think>
                self._at_start = False
                if stripped.startswith(THINK_BEGIN):
                    self._pending, self._state = stripped[len(THINK_BEGIN):], "reasoning"
                    return True
            i = p.find(self._call_begin) if self.tool_format else -1
            if i >= 0:
                self._emit_content(delta, p[:i].rstrip())
                self._pending, self._state = p[i + len(self._call_begin):], "tool"
                return True
            keep = max(_partial_suffix(p, m) for m in (self._call_begin, *self._drop)) if self.tool_format else 0
            body = p[:len(p) - keep]
            ready = body.rstrip()  # trailing whitespace waits: it may be what separates content from a tool call
            self._emit_content(delta, ready)
            self._pending = body[len(ready):] + p[len(p) - keep:]
            return False
        i = p.find(self._call_end) if self._call_end is not None else -1
        if i < 0:
            return False
        calls = self._format.parse(p[:i].strip(), self._raw_arguments)
        if calls is None:  # not a well-formed call: keep the text as content rather than lose it
            self._emit_content(delta, self._call_begin + p[:i + len(self._call_end)])
        else:
            delta.tool_calls.extend(calls)
        self._pending, self._state = p[i + len(self._call_end):], "content"
        return True

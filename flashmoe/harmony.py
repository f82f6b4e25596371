"""GPT-OSS's output format (OpenAI's harmony), split into reasoning, content and tool calls as it streams.

A reply is a run of messages, each a header and a body:

    <|channel|>analysis<|message|>THINKING<|end|>
    <|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{ARGS}<|call|>
    <|start|>assistant<|channel|>final<|message|>ANSWER<|return|>

The analysis channel is reasoning, the final channel (and commentary addressed to no one: a preamble) is content,
and a message addressed `to=functions.NAME` (in the header, after the role or after the channel) is a tool call
whose body is its JSON arguments. The markers are special tokens, so the text must be decoded with them kept
(textstream.IncrementalDecoder(markers=tool_formats.harmony.MARKERS)). Text before any header is taken as content, so a model that
writes none still answers.
"""

from __future__ import annotations

import json
import re

from .chat import ParsedDelta, StreamParser, ToolCall, _partial_suffix

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")
_RECIPIENT = re.compile(r"to=(\S+?)(?=\s|<\||$)")
_CHANNEL = re.compile(re.escape(CHANNEL) + r"\s*([A-Za-z_]+)")


class HarmonyParser(StreamParser):
    """OutputParser's interface (feed / close -> ParsedDelta) for harmony replies."""

    def __init__(self):
        super().__init__()
        self._state = "header"
        self._channel = "final"
        self._recipient: str | None = None
        self._body = ""  # a tool call's arguments, gathered until its end

    def close(self) -> ParsedDelta:
        delta = ParsedDelta()
        rest, self._pending = self._pending, ""
        if self._state == "body" and self._recipient is None:
            self._emit(delta, rest)
        elif self._state == "body":  # a call cut short is shown as the text it is
            self._emit_content(delta, self._body + rest)
        elif self._state == "header" and rest and not rest.lstrip().startswith(("<|", "to=")):
            self._emit_content(delta, rest)
        return delta

    def _step(self, delta: ParsedDelta) -> bool:
        p = self._pending
        if self._state == "header":
            i = p.find(MESSAGE)
            if i < 0:
                stripped = p.lstrip()
                if stripped and not any(m.startswith(stripped[:len(m)]) for m in ("<|", "to=")):
                    # no header at all: plain text, read as the final answer
                    self._channel, self._recipient, self._state = "final", None, "body"
                    return True
                return False
            self._open(p[:i])
            self._pending, self._state = p[i + len(MESSAGE):], "body"
            return True
        ends = [(p.find(m), m) for m in ENDS if m in p]
        if not ends:
            keep = max(_partial_suffix(p, m) for m in ENDS)
            self._body_text(delta, p[:len(p) - keep])
            self._pending = p[len(p) - keep:]
            return False
        i, marker = min(ends)
        self._body_text(delta, p[:i])
        if self._recipient is not None:
            self._call(delta)
        self._pending, self._state = p[i + len(marker):], "header"
        return True

    def _open(self, header: str) -> None:
        """A message's header: its channel and whom it is addressed to."""
        header = header.replace(START, "")
        channel = _CHANNEL.search(header)
        self._channel = channel.group(1) if channel else "final"
        recipient = _RECIPIENT.search(header)
        self._recipient = recipient.group(1) if recipient else None
        self._body = ""

    def _body_text(self, delta: ParsedDelta, text: str) -> None:
        if self._recipient is not None:
            self._body += text
        else:
            self._emit(delta, text)

    def _emit(self, delta: ParsedDelta, text: str) -> None:
        if self._channel == "analysis":
            delta.reasoning += text
        else:
            self._emit_content(delta, text)

    def _call(self, delta: ParsedDelta) -> None:
        name = self._recipient.removeprefix("functions.")
        try:
            arguments = json.loads(self._body) if self._body.strip() else {}
        except json.JSONDecodeError:
            arguments = None
        if isinstance(arguments, dict):
            delta.tool_calls.append(ToolCall(name, json.dumps(arguments, ensure_ascii=False)))
        else:  # not a well-formed call: keep its text as content rather than lose it
            self._emit_content(delta, self._body)

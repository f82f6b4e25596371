"""Chat: render messages with the checkpoint's own template, and split the model's output into reasoning,
content and tool calls, also while it streams.

Tool-call formats, read off the template: Qwen3 and Qwen3-Next write `<tool_call>{"name", "arguments"}</tool_call>`
("json"); Qwen3.5 writes `<tool_call><function=NAME><parameter=KEY>VALUE</parameter></function></tool_call>`
("xml"); GLM-4.5 writes `<tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value></tool_call>` ("glm").
The last two write string values raw and other values as JSON. DeepSeek-V3.1 writes
`<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{ARGUMENTS}<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`
("deepseek": a section around one or more calls). MiniMax-M2 writes `<minimax:tool_call>\n<invoke name="NAME">\n
<parameter name="KEY">VALUE</parameter>\n...</invoke>\n</minimax:tool_call>` ("minimax": values as the XML format
writes them). Kimi-K2 writes `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:INDEX
<|tool_call_argument_begin|>{ARGUMENTS}<|tool_call_end|>...<|tool_calls_section_end|>` ("kimi": the call's id is
functions.NAME:INDEX, as its template refers to it). Mistral writes `[TOOL_CALLS] [{"name": ..., "arguments": {...}},
...]` to the end of the turn ("mistral": no closing marker, so its calls come when the text ends; ids of 9 letters and
digits, which its templates check). GPT-OSS's whole reply is harmony messages ("harmony": harmony.py
parses it).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from .errors import FlashMoeError

THINK_BEGIN, THINK_END = "<think>", "</think>"
CALL_BEGIN, CALL_END = "<tool_call>", "</tool_call>"
# DeepSeek-V3.1's: a section of calls, each NAME<｜tool▁sep｜>JSON
DS_SECTION_BEGIN, DS_SECTION_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
# per format: (what opens a call, what closes it, markup around the calls that the reply's text leaves out)
MINIMAX_SECTION_BEGIN, MINIMAX_SECTION_END = "<minimax:tool_call>", "</minimax:tool_call>"
MINIMAX_CALL_BEGIN, MINIMAX_CALL_END = '<invoke name="', "</invoke>"
KIMI_SECTION_BEGIN, KIMI_SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
KIMI_CALL_BEGIN, KIMI_CALL_END, KIMI_ARGUMENTS = "<|tool_call_begin|>", "<|tool_call_end|>", "<|tool_call_argument_begin|>"
_KIMI_ID = re.compile(r"functions\.([^:\s]+):(\d+)")
MISTRAL_CALLS = "[TOOL_CALLS]"
CALL_MARKUP = {"deepseek": (DS_CALL_BEGIN, DS_CALL_END, (DS_SECTION_BEGIN, DS_SECTION_END)),
               "kimi": (KIMI_CALL_BEGIN, KIMI_CALL_END, (KIMI_SECTION_BEGIN, KIMI_SECTION_END)),
               "mistral": (MISTRAL_CALLS, None, ()),  # the calls run to the end of the turn
               "minimax": (MINIMAX_CALL_BEGIN, MINIMAX_CALL_END, (MINIMAX_SECTION_BEGIN, MINIMAX_SECTION_END))}
_XML_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.DOTALL)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)
_GLM_ARGUMENT = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)
_MINIMAX_PARAMETER = re.compile(r'<parameter name="([^"]*)">(.*?)</parameter>', re.DOTALL)


HARMONY_MARKERS = ("<|channel|>", "<|message|>")


def is_harmony(template: str | None) -> bool:
    """Whether replies are harmony messages (GPT-OSS): channels, not <think> and <tool_call>."""
    return bool(template) and all(m in template for m in HARMONY_MARKERS)


HARMONY_TOKENS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>", "<|constrain|>")


def format_markers(tool_format: str | None, harmony: bool = False) -> tuple[str, ...]:
    """The markup the output parsers read, for IncrementalDecoder to keep where the tokenizer makes it special."""
    if harmony:
        return HARMONY_TOKENS
    begin, end, drop = CALL_MARKUP.get(tool_format, (CALL_BEGIN, CALL_END, ()))
    glm = ("<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>") if tool_format == "glm" else ()
    sep = {"deepseek": (DS_SEP,), "kimi": (KIMI_ARGUMENTS,)}.get(tool_format, ())
    return tuple(m for m in (THINK_BEGIN, THINK_END, begin, end, *drop, *glm, *sep) if m)


def detect_tool_format(template: str | None) -> str | None:
    """"xml", "glm", "json", "harmony" or None (the template does not take tools)."""
    if not template or "tools" not in template:
        return None
    if is_harmony(template):
        return "harmony"
    if MINIMAX_SECTION_BEGIN in template:
        return "minimax"
    if KIMI_SECTION_BEGIN in template:
        return "kimi"
    if MISTRAL_CALLS in template:
        return "mistral"
    if DS_SEP in template and DS_CALL_BEGIN in template:
        if "```json" in template:  # DeepSeek-V3/R1's older calls (function<｜tool▁sep｜>NAME and a fenced block)
            return None
        return "deepseek"
    if "<arg_key>" in template:
        return "glm"
    if "<function=" in template:
        return "xml"
    if CALL_BEGIN in template:
        return "json"
    return None


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


def mistral_calls(body: str) -> list[ToolCall] | None:
    """What follows [TOOL_CALLS]: a JSON list of {"name", "arguments"[, "id"]} objects, or None if it is not one."""
    try:
        calls = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(calls, list) or not calls or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("arguments", {}), dict)
            for c in calls):
        return None
    return [ToolCall(c["name"], json.dumps(c.get("arguments", {}), ensure_ascii=False),
                     id=c["id"] if isinstance(c.get("id"), str) and len(c["id"]) == 9 else _nine_characters())
            for c in calls]


def _nine_characters() -> str:
    return uuid.uuid4().hex[:9]


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass
class ParsedDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


def _resolve(schema, root: dict, depth: int = 0):
    """`schema` with a local $ref ("#/$defs/Unit", as pydantic writes enums) replaced by what it points to."""
    if not isinstance(schema, dict) or not str(schema.get("$ref", "")).startswith("#/") or depth > 32:
        return schema
    target = root
    for part in schema["$ref"][2:].split("/"):
        target = target.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
    if not isinstance(target, dict):
        return schema  # left for xgrammar to resolve or report
    rest = {k: v for k, v in schema.items() if k != "$ref"}
    return _resolve({**target, **rest}, root, depth + 1)


def argument_schemas(parameters: dict | None) -> dict[str, dict | bool]:
    """A tool's arguments by name, in the schema's order, each schema with its local $ref resolved; a required
    argument the properties do not list takes any JSON value."""
    parameters = parameters or {}
    props = parameters.get("properties") or {}
    schemas = {key: _resolve(schema, parameters) for key, schema in props.items()}
    for key in parameters.get("required") or []:
        schemas.setdefault(key, {})
    return schemas


def writes_raw(schema) -> bool:
    """Whether the XML and GLM formats write a value of this schema as its raw text rather than as JSON: Qwen3.5's
    and GLM-4.5's templates write a string as it is and anything else with tojson. A string is a schema of type "string"
    (a `format` aside: xgrammar constrains formats only as JSON strings) or an enum or const of strings only.
    The grammar (structural_tags.py) and the parser decide with this one function, so they cannot disagree."""
    if not isinstance(schema, dict):
        return False
    if "enum" in schema or "const" in schema:
        values = schema.get("enum", [schema.get("const")])
        return schema.get("type", "string") == "string" and bool(values) and all(isinstance(v, str) for v in values)
    return schema.get("type") == "string" and "format" not in schema


def _raw_arguments(tools: list[dict] | None) -> dict[str, set[str]]:
    """For each tool, the arguments the XML and GLM formats write as raw text (the others are JSON)."""
    raw = {}
    for tool in tools or []:
        fn = tool.get("function", {})
        raw[fn.get("name")] = {k for k, schema in argument_schemas(fn.get("parameters")).items() if writes_raw(schema)}
    return raw


def _json_text(text: str) -> str | None:
    """`text` stripped if it is one JSON value, else None. The text is kept rather than re-serialized so that
    a number stays as written: json.dumps(json.loads("1e999")) is "Infinity", which is not JSON."""
    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    try:
        json.loads(text, parse_constant=no_constants)
    except ValueError:
        return None
    return text.strip()


def parse_tool_call(block: str, tool_format: str, raw_arguments: dict[str, set[str]]) -> ToolCall | None:
    """The text between <tool_call> and </tool_call> (the format's own markers) as a ToolCall, or None if it is not
    one."""
    if tool_format == "kimi":  # functions.NAME:INDEX<|tool_call_argument_begin|>{...}
        head, sep, arguments = block.partition(KIMI_ARGUMENTS)
        match, arguments = _KIMI_ID.fullmatch(head.strip()), _json_text(arguments) if sep else None
        if match is None or arguments is None or not arguments.startswith("{"):
            return None
        return ToolCall(match.group(1), arguments, id=head.strip())
    if tool_format == "deepseek":  # NAME<｜tool▁sep｜>{...}
        name, sep, arguments = block.partition(DS_SEP)
        name, arguments = name.strip(), _json_text(arguments) if sep else None
        if not name or arguments is None or not arguments.startswith("{"):
            return None
        return ToolCall(name, arguments)
    if tool_format == "json":
        try:
            obj = json.loads(block)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", {})
        if isinstance(args, str):
            return ToolCall(obj["name"], args)
        head = f'{{"name": {json.dumps(obj["name"])}, "arguments": '  # as the template and the grammar write it
        as_written = _json_text(block[len(head):-1]) if block.startswith(head) and block.endswith("}") else None
        return ToolCall(obj["name"], as_written or json.dumps(args, ensure_ascii=False))
    if tool_format == "minimax":  # NAME">, then <parameter name="KEY">VALUE</parameter>\n per argument
        name, sep, rest = block.partition('">')
        name, pairs = name.strip(), _MINIMAX_PARAMETER.findall(rest)
        if not sep or not name or '"' in name or "\n" in name:
            return None
    elif tool_format == "glm":  # NAME, then <arg_key>KEY</arg_key>\n<arg_value>VALUE</arg_value> per argument
        name, _, rest = block.partition("<arg_key>")
        name, pairs = name.strip(), _GLM_ARGUMENT.findall("<arg_key>" + rest if rest else "")
        if not name or "<" in name or "\n" in name:
            return None
    else:
        match = _XML_FUNCTION.search(block)
        if match is None:
            return None
        # the template writes "<parameter=KEY>\nVALUE\n</parameter>": those two newlines are markup, the rest
        # is the value, a string's own leading or trailing whitespace included (the grammar adds none)
        name = match.group(1).strip()
        pairs = [(k, v.removeprefix("\n").removesuffix("\n")) for k, v in _XML_PARAMETER.findall(match.group(2))]
    raw_keys = raw_arguments.get(name, set())
    fields = {}
    for key, value in pairs:
        key = key.strip()
        as_json = None if key in raw_keys else _json_text(value)  # text no grammar shaped may not be JSON
        fields[key] = as_json or json.dumps(value, ensure_ascii=False)
    arguments = ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {v}" for k, v in fields.items())
    return ToolCall(name, "{" + arguments + "}")


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
        self._call_begin, self._call_end, self._drop = CALL_MARKUP.get(tool_format, (CALL_BEGIN, CALL_END, ()))
        self._raw_arguments = _raw_arguments(tools)
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
            calls = mistral_calls(rest)
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
        call = parse_tool_call(p[:i].strip(), self.tool_format, self._raw_arguments)
        if call is None:  # not a well-formed call: keep the text as content rather than lose it
            self._emit_content(delta, self._call_begin + p[:i + len(self._call_end)])
        else:
            delta.tool_calls.append(call)
        self._pending, self._state = p[i + len(self._call_end):], "content"
        return True

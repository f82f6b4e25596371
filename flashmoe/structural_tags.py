"""What constrained output may look like, as xgrammar structural tags: one JSON value, or tool calls written
exactly as the chat templates write them, so that chat.py's parser reads back arguments that match the schema.

Built here rather than with xgrammar's get_model_structural_tag (0.2.8), whose Qwen formats disagree with the
templates and the parser: its qwen_xml style allows whitespace around every non-string value (an enum of C/F
came back as '\\t\\n\\n\\rC'), and its "required" choice lets free text follow the calls until max_tokens.
"""

from __future__ import annotations

import json

from xgrammar.structural_tag import (AnyTextFormat, ConstStringFormat, JSONSchemaFormat, OptionalFormat,
                                     OrFormat, RegexFormat, SequenceFormat, StructuralTag, TagFormat,
                                     TagsWithSeparatorFormat, TriggeredTagsFormat)

from .chat import (CALL_BEGIN, CALL_END, DS_CALL_BEGIN, DS_CALL_END, DS_SECTION_BEGIN, DS_SECTION_END, DS_SEP,
                   KIMI_ARGUMENTS, KIMI_CALL_BEGIN, KIMI_CALL_END, KIMI_SECTION_BEGIN, KIMI_SECTION_END, MISTRAL_CALLS,
                   MINIMAX_SECTION_BEGIN, MINIMAX_SECTION_END, THINK_BEGIN, THINK_END, argument_schemas, writes_raw)
from .errors import FlashMoeError

# longest run of whitespace allowed between JSON elements: room for pretty-printing, while a weak (or 2-bit)
# model cannot loop on newlines until max_tokens and leave output that does not parse
MAX_WHITESPACE_RUN = 16
# the parser ends a value, a call's arguments and a call at the first of these: no string in an XML or GLM call holds one
CLOSING_MARKUP = ["</parameter>", "</function>", "</arg_value>", CALL_END, "</invoke>"]
# how the XML (Qwen3.5) and GLM (GLM-4.5) formats write one argument around its key and its value
ARGUMENT_MARKUP = {"xml": ("<parameter=", ">\n", "\n</parameter>\n"),
                   "glm": ("<arg_key>", "</arg_key>\n<arg_value>", "</arg_value>\n"),
                   "minimax": ('<parameter name="', '">', "</parameter>\n")}
# per format, the characters a parameter's name may not hold (they would end its markup)
KEY_STOPS = {"xml": ">\n", "glm": "<", "minimax": '"\n'}
# the keywords whose values are data, not schemas (the rewrite leaves them as they are), and those whose values
# map names to schemas (a property may be called "enum")
_DATA_KEYWORDS = {"enum", "const", "default", "examples"}
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
# Regex character classes: xgrammar compiles a class that spans UTF-8 lengths (such as [^"]) to bytes that
# also take overlong and surrogate encodings, which decode to two or three U+FFFD and break maxLength; a class
# per length takes valid UTF-8 only. The first class differs: a JSON string's literal characters leave out
# control characters, quote and backslash; in a tool call, strings also leave out the "<" of closing markup.
_WIDE_CHARS = r"|[\u0800-\ud7ff]|[\ue000-\uffff]|[\u{10000}-\u{10ffff}]"
JSON_CHAR = r'(?:[ !#-\[\]-\u07ff]' + _WIDE_CHARS + ")"
JSON_CHAR_IN_CALL = r'(?:[ !#-;=-\[\]-\u07ff]' + _WIDE_CHARS + ")"
RAW_CHAR_IN_CALL = r"(?:[\x00-;=-\u07ff]" + _WIDE_CHARS + ")"


def xgrammar_schema(schema, char: str = JSON_CHAR):
    """`schema` with every length-bounded string rewritten as a pattern of `char`s, which xgrammar handles.

    xgrammar 0.2.8 compiles a string with minLength/maxLength to `[^"\\\\\\r\\n]{m,n}`, which takes raw control
    characters (a tab, \\x01) that JSON forbids inside a string: 3 of 8 sampled outputs did not parse. A pattern
    becomes a JSON-string regex instead. (A string with a pattern of its own keeps it, and xgrammar ignores its
    length bounds, as it always has.)
    """
    if isinstance(schema, list):
        return [xgrammar_schema(s, char) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: xgrammar_schema(v, char) for name, v in value.items()}
        else:
            out[key] = value if key in _DATA_KEYWORDS else xgrammar_schema(value, char)
    kind = out.get("type")
    is_string = kind == "string" or (isinstance(kind, list) and "string" in kind)
    if is_string and not {"pattern", "format", "enum", "const"} & set(out):
        repeat = _length_bounds(out)
        if repeat:
            out.pop("minLength", None)
            out.pop("maxLength", None)
            out["pattern"] = f"^{char}{repeat}$"
    return out


def _length_bounds(schema: dict) -> str | None:
    """The regex repeat `{m,n}` of a string's minLength/maxLength; None if it has neither or a bad one (which
    xgrammar then reports)."""
    lo, hi = schema.get("minLength", 0), schema.get("maxLength")
    if ("minLength" not in schema and "maxLength" not in schema) or not all(
            type(b) is int and b >= 0 for b in (lo, 0 if hi is None else hi)):
        return None
    return f"{{{lo},{'' if hi is None else hi}}}"


def json_value(schema, excludes: list[str] | None = None) -> JSONSchemaFormat:
    """A JSON value matching `schema` in which no string holds one of `excludes` (the markup that would end
    the tool call around it)."""
    return JSONSchemaFormat(json_schema=xgrammar_schema(schema, JSON_CHAR_IN_CALL if excludes else JSON_CHAR),
                            excludes=excludes or [], max_whitespace_cnt=MAX_WHITESPACE_RUN)


def json_output(schema: dict | None, reasoning: str) -> StructuralTag:
    """Any JSON object (schema None, OpenAI's json_object) or one matching `schema` (json_schema)."""
    return _after_reasoning(json_value(schema if schema is not None else {"type": "object"}), reasoning)


def tool_calls(tool_format: str, tools: list[dict], tool_choice, reasoning: str,
               parallel_tool_calls: bool) -> StructuralTag:
    """Calls in the model's own format. "auto": text with calls anywhere in it; "required": one call or, with
    parallel_tool_calls, several separated by newlines as the templates write them, then the end of the turn;
    a named function: exactly that one call, then the end of the turn."""
    if tool_format == "harmony":
        return _harmony_call(tools, tool_choice)
    if tool_format in ("deepseek", "kimi"):
        return _section_calls(tool_format, tools, tool_choice, reasoning, parallel_tool_calls)
    if tool_format == "mistral":
        return _mistral_calls(tools, tool_choice, reasoning, parallel_tool_calls)
    if isinstance(tool_choice, dict):
        return _after_reasoning(_call_tag(tool_format, _chosen(tools, tool_choice)[0]), reasoning)
    tags = [_call_tag(tool_format, t) for t in tools]
    if tool_choice == "required":
        calls = TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True,
                                        stop_after_first=not parallel_tool_calls)
    else:
        trigger = MINIMAX_SECTION_BEGIN if tool_format == "minimax" else CALL_BEGIN
        calls = TriggeredTagsFormat(triggers=[trigger], tags=tags, excludes=[THINK_BEGIN, THINK_END],
                                    stop_after_first=not parallel_tool_calls)
    return _after_reasoning(calls, reasoning)


def _chosen(tools: list[dict], tool_choice) -> list[dict]:
    """The tools a call may name: the one tool_choice names, or all of them."""
    if not isinstance(tool_choice, dict):
        return tools
    name = tool_choice["function"]["name"]
    chosen = [t for t in tools if t["function"]["name"] == name]
    if not chosen:
        raise FlashMoeError(f"tool_choice names {name!r}, which is not among the tools")
    return chosen


def _parameters(tool: dict) -> dict:
    """A tool's parameters schema (none: any object)."""
    return tool["function"].get("parameters") or {"type": "object"}


def _harmony_call(tools: list[dict], tool_choice) -> StructuralTag:
    """GPT-OSS's forced call (harmony.py): one commentary message to the function with JSON arguments, ended by
    <|call|> (which ends the turn). No analysis message first: one of unbounded length let a weak model write it until
    max_tokens and never call. "auto" is not constrained."""
    if not (tool_choice == "required" or isinstance(tool_choice, dict)):
        raise FlashMoeError("harmony tool calls are constrained only when forced (tool_choice required or named)")
    tools = _chosen(tools, tool_choice)
    calls = [TagFormat(begin=f"<|channel|>commentary to=functions.{t['function']['name']} <|constrain|>json<|message|>",
                       content=json_value(_parameters(t), ["<|call|>"]),
                       end="<|call|>") for t in tools]
    return StructuralTag(format=calls[0] if len(calls) == 1 else OrFormat(elements=calls))


def _mistral_calls(tools: list[dict], tool_choice, reasoning: str, parallel_tool_calls: bool) -> StructuralTag:
    """Mistral's calls: [TOOL_CALLS] then one JSON list of {"name", "arguments"} objects, which ends the turn."""
    tools = _chosen(tools, tool_choice)
    objects = [TagFormat(begin=f'{{"name": {json.dumps(t["function"]["name"])}, "arguments": ',
                         content=json_value(_parameters(t)), end="}")
               for t in tools]
    several = parallel_tool_calls and not isinstance(tool_choice, dict)
    calls = TagsWithSeparatorFormat(tags=objects, separator=", ", at_least_one=True, stop_after_first=not several)
    if tool_choice == "auto":
        return _after_reasoning(TriggeredTagsFormat(triggers=[MISTRAL_CALLS], tags=[
            TagFormat(begin=f"{MISTRAL_CALLS} [", content=calls, end="]")], stop_after_first=True), reasoning)
    return _after_reasoning(SequenceFormat(elements=[ConstStringFormat(value=f"{MISTRAL_CALLS} ["), calls,
                                                     ConstStringFormat(value="]")]), reasoning)


# per format: (section begin, section end, call begin + NAME + this, call end) of the formats whose calls sit in a section
SECTION_MARKUP = {"deepseek": (DS_SECTION_BEGIN, DS_SECTION_END, DS_CALL_BEGIN, DS_SEP, DS_CALL_END),
                  "kimi": (KIMI_SECTION_BEGIN, KIMI_SECTION_END, KIMI_CALL_BEGIN + "functions.", None, KIMI_CALL_END)}


def _section_calls(tool_format: str, tools: list[dict], tool_choice, reasoning: str,
                   parallel_tool_calls: bool) -> StructuralTag:
    """DeepSeek-V3.1's and Kimi-K2's calls: one section of calls (several with parallel_tool_calls), each its
    name then JSON arguments (DeepSeek: NAME<｜tool▁sep｜>; Kimi: functions.NAME:INDEX<|tool_call_argument_begin|>);
    "auto" lets text come first and the section start anywhere (its opening marker triggers it)."""
    tools = _chosen(tools, tool_choice)
    section_begin, section_end, call_begin, sep, call_end = SECTION_MARKUP[tool_format]

    def arguments(t):
        schema = json_value(_parameters(t), [call_end])
        if sep is not None:
            return schema
        return SequenceFormat(elements=[RegexFormat(pattern=r"[0-9]{1,3}"), ConstStringFormat(value=KIMI_ARGUMENTS),
                                        schema])

    tags = [TagFormat(begin=f"{call_begin}{t['function']['name']}{sep if sep is not None else ':'}",
                      content=arguments(t), end=call_end) for t in tools]
    several = parallel_tool_calls and not isinstance(tool_choice, dict)
    calls = TagsWithSeparatorFormat(tags=tags, separator="", at_least_one=True, stop_after_first=not several)
    if tool_choice == "auto":
        section = TriggeredTagsFormat(triggers=[section_begin], tags=[
            TagFormat(begin=section_begin, content=calls, end=section_end)], excludes=[THINK_BEGIN, THINK_END],
            stop_after_first=True)
        return _after_reasoning(section, reasoning)
    section = SequenceFormat(elements=[ConstStringFormat(value=section_begin), calls,
                                       ConstStringFormat(value=section_end)])
    return _after_reasoning(section, reasoning)


def _call_tag(tool_format: str, tool: dict) -> TagFormat:
    function = tool["function"]
    name, parameters = function["name"], _parameters(tool)
    if tool_format == "json":  # Qwen3 / Qwen3-Next: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>
        return TagFormat(begin=f'{CALL_BEGIN}\n{{"name": {json.dumps(name)}, "arguments": ',
                         content=json_value(parameters, [CALL_END]), end=f"}}\n{CALL_END}")
    if tool_format == "minimax":  # MiniMax-M2: one invoke per block, as its template writes a call
        return TagFormat(begin=f'{MINIMAX_SECTION_BEGIN}\n<invoke name="{name}">\n',
                         content=_xml_arguments(name, parameters, "minimax"), end=f"</invoke>\n{MINIMAX_SECTION_END}")
    if tool_format == "glm":  # GLM-4.5: <tool_call>NAME\n<arg_key>KEY</arg_key>\n<arg_value>VALUE</arg_value>\n...
        return TagFormat(begin=f"{CALL_BEGIN}{name}\n", content=_xml_arguments(name, parameters, "glm"), end=CALL_END)
    return TagFormat(begin=f"{CALL_BEGIN}\n<function={name}>\n", content=_xml_arguments(name, parameters, "xml"),
                     end=f"</function>\n{CALL_END}")


def _xml_arguments(tool: str, parameters: dict, tool_format: str) -> SequenceFormat:
    """Each argument as the format writes it (ARGUMENT_MARKUP: Qwen3.5's `<parameter=KEY>\\nVALUE\\n</parameter>\\n`,
    GLM-4.5's `<arg_key>KEY</arg_key>\\n<arg_value>VALUE</arg_value>\\n`), in the schema's order: the required ones
    always, the others optionally; a string VALUE raw, any other as JSON (chat.writes_raw)."""
    before_key, before_value, after_value = ARGUMENT_MARKUP[tool_format]
    defs = {k: parameters[k] for k in ("$defs", "definitions") if k in parameters}  # for a JSON value's $refs
    required = parameters.get("required") or []
    elements = []
    for key, schema in argument_schemas(parameters).items():
        if any(c in key for c in KEY_STOPS[tool_format]):  # what would end its markup
            raise FlashMoeError(f"tool {tool!r}: the parameter name {key!r} cannot be written in a tool call")
        if writes_raw(schema):
            value = _raw_string(tool, key, schema)
        else:
            value = json_value({**defs, **schema} if isinstance(schema, dict) else schema, CLOSING_MARKUP)
        argument = SequenceFormat(elements=[ConstStringFormat(value=f"{before_key}{key}{before_value}"), value,
                                            ConstStringFormat(value=after_value)])
        elements.append(argument if key in required else OptionalFormat(content=argument))
    return SequenceFormat(elements=elements or [ConstStringFormat(value="")])


def _raw_string(tool: str, key: str, schema: dict):
    """A string value as the template writes it: the characters themselves, no quotes, no escapes."""
    if "enum" in schema or "const" in schema:
        values = [v for v in schema.get("enum", [schema.get("const")]) if not any(m in v for m in CLOSING_MARKUP)]
        if not values:
            raise FlashMoeError(f"tool {tool!r}: no value of the parameter {key!r} can be written in a tool call")
        return OrFormat(elements=[ConstStringFormat(value=v) for v in values])
    if "pattern" in schema:  # the schema's own: trusted not to match closing markup
        return RegexFormat(pattern=schema["pattern"])
    repeat = _length_bounds(schema)
    if repeat:  # a regex cannot leave out a word, so a bounded string leaves out "<", which closing markup starts with
        return RegexFormat(pattern=RAW_CHAR_IN_CALL + repeat)
    if "minLength" in schema or "maxLength" in schema:
        raise FlashMoeError(f"tool {tool!r}: the parameter {key!r} needs integer minLength/maxLength >= 0")
    return AnyTextFormat(excludes=CLOSING_MARKUP)


def _after_reasoning(body, reasoning: str) -> StructuralTag:
    """`body` after a think block: its rest ("enabled": the prompt opened it), optional ("auto") or none."""
    if reasoning == "disabled":
        return StructuralTag(format=body)
    block = TagFormat(begin="" if reasoning == "enabled" else THINK_BEGIN,
                      content=AnyTextFormat(excludes=[THINK_BEGIN, THINK_END]), end=THINK_END)
    block = SequenceFormat(elements=[block, ConstStringFormat(value="\n\n")])
    if reasoning == "auto":
        block = OptionalFormat(content=block)
    return StructuralTag(format=SequenceFormat(elements=[block, body]))

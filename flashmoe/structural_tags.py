"""What constrained output may look like, as xgrammar structural tags: one JSON value, or tool calls written
exactly as the chat templates write them, so that chat.py's parser reads back arguments that match the schema.

Built here rather than with xgrammar's get_model_structural_tag (0.2.8), whose Qwen formats disagree with the
templates and the parser: its qwen_xml style allows whitespace around every non-string value (an enum of C/F
came back as '\\t\\n\\n\\rC'), and its "required" choice lets free text follow the calls until max_tokens.
"""

from __future__ import annotations


from xgrammar.structural_tag import (AnyTextFormat, ConstStringFormat, JSONSchemaFormat, OptionalFormat,
                                     OrFormat, RegexFormat, SequenceFormat, StructuralTag, TagFormat,
                                     TagsWithSeparatorFormat, TriggeredTagsFormat)

from . import tool_formats
from .errors import FlashMoeError
from .tool_formats.common import THINK_BEGIN, THINK_END, argument_schemas, writes_raw

# longest run of whitespace allowed between JSON elements: room for pretty-printing, while a weak (or 2-bit)
# model cannot loop on newlines until max_tokens and leave output that does not parse
MAX_WHITESPACE_RUN = 16
# the parser ends a value, a call's arguments and a call at the first of these: no string in an XML-like call holds one
CLOSING_MARKUP = ["</parameter>", "</function>", "</arg_value>", "</tool_call>", "</invoke>"]
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
    return after_reasoning(json_value(schema if schema is not None else {"type": "object"}), reasoning)


def tool_calls(tool_format: str, tools: list[dict], tool_choice, reasoning: str,
               parallel_tool_calls: bool) -> StructuralTag:
    """Calls in the model's own format (its module in tool_formats/ builds them). "auto": text with calls anywhere in
    it; "required": one call or, with parallel_tool_calls, several as the template writes them, then the end of the
    turn; a named function: exactly that one call, then the end of the turn."""
    return tool_formats.get(tool_format).grammar(tools, tool_choice, reasoning, parallel_tool_calls)


def chosen(tools: list[dict], tool_choice) -> list[dict]:
    """The tools a call may name: the one tool_choice names, or all of them."""
    if not isinstance(tool_choice, dict):
        return tools
    name = tool_choice["function"]["name"]
    found = [t for t in tools if t["function"]["name"] == name]
    if not found:
        raise FlashMoeError(f"tool_choice names {name!r}, which is not among the tools")
    return found


def parameters_of(tool: dict) -> dict:
    """A tool's parameters schema (none: any object)."""
    return tool["function"].get("parameters") or {"type": "object"}


def tagged_calls(tags: list[TagFormat], trigger: str, tool_choice, reasoning: str,
                 parallel_tool_calls: bool) -> StructuralTag:
    """Calls each in its own tag (tags: one per tool of `chosen`): a named function's one tag; "required": one or,
    with parallel_tool_calls, several separated by newlines as the templates write them; "auto": text, with calls
    wherever `trigger` starts one."""
    if isinstance(tool_choice, dict):
        return after_reasoning(tags[0], reasoning)
    if tool_choice == "required":
        calls = TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True,
                                        stop_after_first=not parallel_tool_calls)
    else:
        calls = TriggeredTagsFormat(triggers=[trigger], tags=tags, excludes=[THINK_BEGIN, THINK_END],
                                    stop_after_first=not parallel_tool_calls)
    return after_reasoning(calls, reasoning)


def section_calls(section_begin: str, section_end: str, tags: list[TagFormat], tool_choice, reasoning: str,
                  parallel_tool_calls: bool, separator: str = "") -> StructuralTag:
    """Calls in one section (DeepSeek's, Kimi-K2's): the section's markers around one call (several, `separator`
    apart, with parallel_tool_calls); "auto" lets text come first and the section start anywhere (its opening marker
    triggers it)."""
    several = parallel_tool_calls and not isinstance(tool_choice, dict)
    calls = TagsWithSeparatorFormat(tags=tags, separator=separator, at_least_one=True, stop_after_first=not several)
    if tool_choice == "auto":
        section = TriggeredTagsFormat(triggers=[section_begin], tags=[
            TagFormat(begin=section_begin, content=calls, end=section_end)], excludes=[THINK_BEGIN, THINK_END],
            stop_after_first=True)
        return after_reasoning(section, reasoning)
    section = SequenceFormat(elements=[ConstStringFormat(value=section_begin), calls,
                                       ConstStringFormat(value=section_end)])
    return after_reasoning(section, reasoning)


def xml_arguments(tool: str, parameters: dict, markup: tuple[str, str, str], key_stops: str) -> SequenceFormat:
    """Each argument as an XML-like format writes it (markup: what goes before its key, between key and value, after
    the value: Qwen3.5's `<parameter=KEY>\\nVALUE\\n</parameter>\\n`, GLM-4.5's `<arg_key>KEY</arg_key>\\n<arg_value>
    VALUE</arg_value>\\n`), in the schema's order: the required ones always, the others optionally; a string VALUE
    raw, any other as JSON (common.writes_raw). key_stops: characters a key may not hold (they would end its
    markup)."""
    before_key, before_value, after_value = markup
    defs = {k: parameters[k] for k in ("$defs", "definitions") if k in parameters}  # for a JSON value's $refs
    required = parameters.get("required") or []
    elements = []
    for key, schema in argument_schemas(parameters).items():
        if any(c in key for c in key_stops):
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


def after_reasoning(body, reasoning: str) -> StructuralTag:
    """`body` after a think block: its rest ("enabled": the prompt opened it), optional ("auto") or none."""
    if reasoning == "disabled":
        return StructuralTag(format=body)
    block = TagFormat(begin="" if reasoning == "enabled" else THINK_BEGIN,
                      content=AnyTextFormat(excludes=[THINK_BEGIN, THINK_END]), end=THINK_END)
    block = SequenceFormat(elements=[block, ConstStringFormat(value="\n\n")])
    if reasoning == "auto":
        block = OptionalFormat(content=block)
    return StructuralTag(format=SequenceFormat(elements=[block, body]))

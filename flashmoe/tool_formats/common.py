"""What the tool-call formats share: the call a parser reports, the arguments' schemas, and how the XML-like formats
(Qwen3.5's, GLM-4.5's, MiniMax-M2's) turn KEY/VALUE pairs back into a JSON object."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

THINK_BEGIN, THINK_END = "<think>", "</think>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def json_text(text: str) -> str | None:
    """`text` stripped if it is one JSON value, else None. The text is kept rather than re-serialized so that
    a number stays as written: json.dumps(json.loads("1e999")) is "Infinity", which is not JSON."""
    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    try:
        json.loads(text, parse_constant=no_constants)
    except ValueError:
        return None
    return text.strip()


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


def raw_arguments(tools: list[dict] | None) -> dict[str, set[str]]:
    """For each tool, the arguments the XML-like formats write as raw text (the others are JSON)."""
    raw = {}
    for tool in tools or []:
        fn = tool.get("function", {})
        raw[fn.get("name")] = {k for k, schema in argument_schemas(fn.get("parameters")).items() if writes_raw(schema)}
    return raw


def call_of_pairs(name: str, pairs: list[tuple[str, str]], raw_arguments: dict[str, set[str]]) -> ToolCall:
    """An XML-like call's KEY/VALUE pairs as a JSON object: a raw string argument's text quoted, any other value kept
    as the JSON it was written as (text no grammar shaped may not be JSON: quoted then)."""
    raw_keys = raw_arguments.get(name, set())
    fields = {}
    for key, value in pairs:
        key = key.strip()
        as_json = None if key in raw_keys else json_text(value)
        fields[key] = as_json or json.dumps(value, ensure_ascii=False)
    arguments = ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {v}" for k, v in fields.items())
    return ToolCall(name, "{" + arguments + "}")

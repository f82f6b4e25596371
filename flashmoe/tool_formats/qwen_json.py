"""Qwen3's and Qwen3-Next's tool calls: `<tool_call>\n{"name": NAME, "arguments": {...}}\n</tool_call>`."""

from __future__ import annotations

import json

from .common import ToolCall, json_text

NAME = "json"
CALL_BEGIN, CALL_END = "<tool_call>", "</tool_call>"
SECTION: tuple[str, ...] = ()
MARKUP: tuple[str, ...] = ()


def detect(template: str) -> bool:
    return CALL_BEGIN in template


def parse(block: str, raw_arguments: dict[str, set[str]]) -> list[ToolCall] | None:
    try:
        obj = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):
        return [ToolCall(obj["name"], args)]
    head = f'{{"name": {json.dumps(obj["name"])}, "arguments": '  # as the template and the grammar write it
    as_written = json_text(block[len(head):-1]) if block.startswith(head) and block.endswith("}") else None
    return [ToolCall(obj["name"], as_written or json.dumps(args, ensure_ascii=False))]


def grammar(tools: list[dict], tool_choice, reasoning: str, parallel_tool_calls: bool):
    from xgrammar.structural_tag import TagFormat

    from .. import structural_tags as st

    tags = [TagFormat(begin=f'{CALL_BEGIN}\n{{"name": {json.dumps(t["function"]["name"])}, "arguments": ',
                      content=st.json_value(st.parameters_of(t), [CALL_END]), end=f"}}\n{CALL_END}")
            for t in st.chosen(tools, tool_choice)]
    return st.tagged_calls(tags, CALL_BEGIN, tool_choice, reasoning, parallel_tool_calls)

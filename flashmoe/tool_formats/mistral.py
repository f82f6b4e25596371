"""Mistral's tool calls: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` to the end of the turn: no closing
marker, so its calls come when the text ends; ids of 9 letters and digits, which its templates check."""

from __future__ import annotations

import json
import uuid

from .common import ToolCall

NAME = "mistral"
CALL_BEGIN, CALL_END = "[TOOL_CALLS]", None  # the calls run to the end of the turn
SECTION: tuple[str, ...] = ()
MARKUP: tuple[str, ...] = ()


def detect(template: str) -> bool:
    return CALL_BEGIN in template


def parse(body: str, raw_arguments: dict[str, set[str]]) -> list[ToolCall] | None:
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
                     id=c["id"] if isinstance(c.get("id"), str) and len(c["id"]) == 9 else uuid.uuid4().hex[:9])
            for c in calls]


def grammar(tools: list[dict], tool_choice, reasoning: str, parallel_tool_calls: bool):
    """[TOOL_CALLS] then one JSON list of {"name", "arguments"} objects, which ends the turn."""
    from xgrammar.structural_tag import ConstStringFormat, SequenceFormat, TagFormat, TagsWithSeparatorFormat, \
        TriggeredTagsFormat

    from .. import structural_tags as st

    objects = [TagFormat(begin=f'{{"name": {json.dumps(t["function"]["name"])}, "arguments": ',
                         content=st.json_value(st.parameters_of(t)), end="}")
               for t in st.chosen(tools, tool_choice)]
    several = parallel_tool_calls and not isinstance(tool_choice, dict)
    calls = TagsWithSeparatorFormat(tags=objects, separator=", ", at_least_one=True, stop_after_first=not several)
    if tool_choice == "auto":
        return st.after_reasoning(TriggeredTagsFormat(triggers=[CALL_BEGIN], tags=[
            TagFormat(begin=f"{CALL_BEGIN} [", content=calls, end="]")], stop_after_first=True), reasoning)
    return st.after_reasoning(SequenceFormat(elements=[ConstStringFormat(value=f"{CALL_BEGIN} ["), calls,
                                                       ConstStringFormat(value="]")]), reasoning)

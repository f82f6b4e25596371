"""Kimi-K2's tool calls: `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:INDEX
<|tool_call_argument_begin|>{ARGUMENTS}<|tool_call_end|>...<|tool_calls_section_end|>`; the call's id is
functions.NAME:INDEX, as its template refers to it."""

from __future__ import annotations

import re

from .common import ToolCall, json_text

NAME = "kimi"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, CALL_END, ARGUMENTS = "<|tool_call_begin|>", "<|tool_call_end|>", "<|tool_call_argument_begin|>"
SECTION = (SECTION_BEGIN, SECTION_END)
MARKUP = (ARGUMENTS,)
_ID = re.compile(r"functions\.([^:\s]+):(\d+)")


def detect(template: str) -> bool:
    return SECTION_BEGIN in template


def parse(block: str, raw_arguments: dict[str, set[str]]) -> list[ToolCall] | None:
    """functions.NAME:INDEX<|tool_call_argument_begin|>{...}"""
    head, sep, arguments = block.partition(ARGUMENTS)
    match, arguments = _ID.fullmatch(head.strip()), json_text(arguments) if sep else None
    if match is None or arguments is None or not arguments.startswith("{"):
        return None
    return [ToolCall(match.group(1), arguments, id=head.strip())]


def grammar(tools: list[dict], tool_choice, reasoning: str, parallel_tool_calls: bool):
    from xgrammar.structural_tag import ConstStringFormat, RegexFormat, SequenceFormat, TagFormat

    from .. import structural_tags as st

    tags = [TagFormat(begin=f"{CALL_BEGIN}functions.{t['function']['name']}:",
                      content=SequenceFormat(elements=[RegexFormat(pattern=r"[0-9]{1,3}"),
                                                       ConstStringFormat(value=ARGUMENTS),
                                                       st.json_value(st.parameters_of(t), [CALL_END])]),
                      end=CALL_END) for t in st.chosen(tools, tool_choice)]
    return st.section_calls(SECTION_BEGIN, SECTION_END, tags, tool_choice, reasoning, parallel_tool_calls)

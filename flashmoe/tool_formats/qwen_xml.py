"""Qwen3.5's (and Qwen3-Coder's) tool calls: `<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n...
</function>\n</tool_call>`, a string VALUE as its raw text, any other as JSON."""

from __future__ import annotations

import re

from .common import ToolCall, call_of_pairs

NAME = "xml"
CALL_BEGIN, CALL_END = "<tool_call>", "</tool_call>"
SECTION: tuple[str, ...] = ()
MARKUP: tuple[str, ...] = ()
ARGUMENT = ("<parameter=", ">\n", "\n</parameter>\n")  # around an argument's key and its value
KEY_STOPS = ">\n"  # what a parameter's name may not hold (it would end its markup)
_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)


def detect(template: str) -> bool:
    return "<function=" in template


def parse(block: str, raw_arguments: dict[str, set[str]]) -> list[ToolCall] | None:
    match = _FUNCTION.search(block)
    if match is None:
        return None
    # the template writes "<parameter=KEY>\nVALUE\n</parameter>": those two newlines are markup, the rest is the
    # value, a string's own leading or trailing whitespace included (the grammar adds none)
    pairs = [(k, v.removeprefix("\n").removesuffix("\n")) for k, v in _PARAMETER.findall(match.group(2))]
    return [call_of_pairs(match.group(1).strip(), pairs, raw_arguments)]


def grammar(tools: list[dict], tool_choice, reasoning: str, parallel_tool_calls: bool):
    from xgrammar.structural_tag import TagFormat

    from .. import structural_tags as st

    tags = []
    for t in st.chosen(tools, tool_choice):
        name = t["function"]["name"]
        tags.append(TagFormat(begin=f"{CALL_BEGIN}\n<function={name}>\n",
                              content=st.xml_arguments(name, st.parameters_of(t), ARGUMENT, KEY_STOPS),
                              end=f"</function>\n{CALL_END}"))
    return st.tagged_calls(tags, CALL_BEGIN, tool_choice, reasoning, parallel_tool_calls)

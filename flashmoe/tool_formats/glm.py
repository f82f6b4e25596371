"""GLM-4.5's tool calls: `<tool_call>NAME\n<arg_key>KEY</arg_key>\n<arg_value>VALUE</arg_value>\n...</tool_call>`, a
string VALUE as its raw text, any other as JSON."""

from __future__ import annotations

import re

from .common import ToolCall, call_of_pairs

NAME = "glm"
CALL_BEGIN, CALL_END = "<tool_call>", "</tool_call>"
SECTION: tuple[str, ...] = ()
MARKUP = ("<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")
ARGUMENT = ("<arg_key>", "</arg_key>\n<arg_value>", "</arg_value>\n")
KEY_STOPS = "<"
_ARGUMENT = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


def detect(template: str) -> bool:
    return "<arg_key>" in template


def parse(block: str, raw_arguments: dict[str, set[str]]) -> list[ToolCall] | None:
    name, _, rest = block.partition("<arg_key>")
    name, pairs = name.strip(), _ARGUMENT.findall("<arg_key>" + rest if rest else "")
    if not name or "<" in name or "\n" in name:
        return None
    return [call_of_pairs(name, pairs, raw_arguments)]


def grammar(tools: list[dict], tool_choice, reasoning: str, parallel_tool_calls: bool):
    from xgrammar.structural_tag import TagFormat

    from .. import structural_tags as st

    tags = [TagFormat(begin=f"{CALL_BEGIN}{t['function']['name']}\n",
                      content=st.xml_arguments(t["function"]["name"], st.parameters_of(t), ARGUMENT, KEY_STOPS),
                      end=CALL_END) for t in st.chosen(tools, tool_choice)]
    return st.tagged_calls(tags, CALL_BEGIN, tool_choice, reasoning, parallel_tool_calls)

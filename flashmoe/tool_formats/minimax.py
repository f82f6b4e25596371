"""MiniMax-M2's tool calls: `<minimax:tool_call>\n<invoke name="NAME">\n<parameter name="KEY">VALUE</parameter>\n...
</invoke>\n</minimax:tool_call>`, values as the XML format writes them."""

from __future__ import annotations

import re

from .common import ToolCall, call_of_pairs

NAME = "minimax"
SECTION_BEGIN, SECTION_END = "<minimax:tool_call>", "</minimax:tool_call>"
CALL_BEGIN, CALL_END = '<invoke name="', "</invoke>"
SECTION = (SECTION_BEGIN, SECTION_END)  # markup around the calls that the reply's text leaves out
MARKUP: tuple[str, ...] = ()
ARGUMENT = ('<parameter name="', '">', "</parameter>\n")
KEY_STOPS = '"\n'
_PARAMETER = re.compile(r'<parameter name="([^"]*)">(.*?)</parameter>', re.DOTALL)


def detect(template: str) -> bool:
    return SECTION_BEGIN in template


def parse(block: str, raw_arguments: dict[str, set[str]]) -> list[ToolCall] | None:
    """NAME">, then <parameter name="KEY">VALUE</parameter>\n per argument."""
    name, sep, rest = block.partition('">')
    name, pairs = name.strip(), _PARAMETER.findall(rest)
    if not sep or not name or '"' in name or "\n" in name:
        return None
    return [call_of_pairs(name, pairs, raw_arguments)]


def grammar(tools: list[dict], tool_choice, reasoning: str, parallel_tool_calls: bool):
    from xgrammar.structural_tag import TagFormat

    from .. import structural_tags as st

    # one invoke per block, as its template writes a call
    tags = [TagFormat(begin=f'{SECTION_BEGIN}\n<invoke name="{t["function"]["name"]}">\n',
                      content=st.xml_arguments(t["function"]["name"], st.parameters_of(t), ARGUMENT, KEY_STOPS),
                      end=f"</invoke>\n{SECTION_END}") for t in st.chosen(tools, tool_choice)]
    return st.tagged_calls(tags, SECTION_BEGIN, tool_choice, reasoning, parallel_tool_calls)

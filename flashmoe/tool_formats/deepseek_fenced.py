"""DeepSeek-V3's and R1's tool calls (before V3.1): a section around one or more calls, each
`<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{ARGUMENTS}\\n```<｜tool▁call▁end｜>`, a newline apart.
Their own templates write calls but list no tools; a template that lists them (vLLM's tool_chat_template_deepseekv3 /
deepseekr1 and the like) is read as this format."""

from __future__ import annotations

from .common import ToolCall, json_text
from .deepseek import CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END, SEP

NAME = "deepseek_fenced"
SECTION = (SECTION_BEGIN, SECTION_END)  # the markers V3.1's calls use too
MARKUP = (SEP,)
FENCE_OPEN, FENCE_CLOSE = "```json\n", "\n```"


def detect(template: str) -> bool:
    return SEP in template and CALL_BEGIN in template and "```json" in template


def parse(block: str, raw_arguments: dict[str, set[str]]) -> list[ToolCall] | None:
    """function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```"""
    kind, sep, rest = block.partition(SEP)
    name, _, fenced = rest.partition("\n")
    fenced = fenced.strip()
    if kind.strip() != "function" or not sep or not fenced.startswith("```json") or not fenced.endswith("```"):
        return None
    name, arguments = name.strip(), json_text(fenced[len("```json") : -len("```")])
    if not name or arguments is None or not arguments.startswith("{"):
        return None
    return [ToolCall(name, arguments)]


def grammar(tools: list[dict], tool_choice, reasoning: str, parallel_tool_calls: bool):
    from xgrammar.structural_tag import TagFormat

    from .. import structural_tags as st

    tags = [TagFormat(begin=f"{CALL_BEGIN}function{SEP}{t['function']['name']}\n{FENCE_OPEN}",
                      content=st.json_value(st.parameters_of(t), [FENCE_CLOSE, CALL_END]),
                      end=FENCE_CLOSE + CALL_END) for t in st.chosen(tools, tool_choice)]
    return st.section_calls(SECTION_BEGIN, SECTION_END, tags, tool_choice, reasoning, parallel_tool_calls,
                            separator="\n")



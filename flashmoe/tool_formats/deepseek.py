"""DeepSeek-V3.1's tool calls: a section around one or more calls, each `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{ARGUMENTS}
<｜tool▁call▁end｜>`. DeepSeek-V3/R1's older calls (function<｜tool▁sep｜>NAME and a fenced JSON block): deepseek_fenced."""

from __future__ import annotations

from .common import ToolCall, json_text

NAME = "deepseek"
SECTION_BEGIN, SECTION_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
SECTION = (SECTION_BEGIN, SECTION_END)
MARKUP = (SEP,)


def detect(template: str) -> bool:
    """True for V3.1's calls, not V3/R1's fenced ones (deepseek_fenced)."""
    return SEP in template and CALL_BEGIN in template and "```json" not in template


def parse(block: str, raw_arguments: dict[str, set[str]]) -> list[ToolCall] | None:
    """NAME<｜tool▁sep｜>{...}"""
    name, sep, arguments = block.partition(SEP)
    name, arguments = name.strip(), json_text(arguments) if sep else None
    if not name or arguments is None or not arguments.startswith("{"):
        return None
    return [ToolCall(name, arguments)]


def grammar(tools: list[dict], tool_choice, reasoning: str, parallel_tool_calls: bool):
    from xgrammar.structural_tag import TagFormat

    from .. import structural_tags as st

    tags = [TagFormat(begin=f"{CALL_BEGIN}{t['function']['name']}{SEP}",
                      content=st.json_value(st.parameters_of(t), [CALL_END]), end=CALL_END)
            for t in st.chosen(tools, tool_choice)]
    return st.section_calls(SECTION_BEGIN, SECTION_END, tags, tool_choice, reasoning, parallel_tool_calls)

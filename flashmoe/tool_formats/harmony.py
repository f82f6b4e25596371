"""GPT-OSS's harmony replies: the whole reply is messages on channels (flashmoe/harmony.py parses them: analysis ->
reasoning, final -> content, commentary to=functions.NAME -> a call). Constrained only when a call is forced."""

from __future__ import annotations

NAME = "harmony"
CALL_BEGIN = CALL_END = None  # not a marked block in free text: the whole reply is read (parse)
SECTION: tuple[str, ...] = ()
MARKUP: tuple[str, ...] = ()
# what the parser reads, kept in the decoded text (the whole set: no <think> or <tool_call> here)
MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>", "<|constrain|>")
TEMPLATE_MARKERS = ("<|channel|>", "<|message|>")


def detect(template: str) -> bool:
    return all(m in template for m in TEMPLATE_MARKERS)


def parse(block: str, raw_arguments: dict[str, set[str]]):
    """A whole harmony reply's calls (harmony.HarmonyParser reads it; the server streams it through that parser
    itself), or None if it makes none."""
    from ..harmony import HarmonyParser

    parser = HarmonyParser()
    calls = parser.feed(block).tool_calls + parser.close().tool_calls
    return calls or None


def grammar(tools: list[dict], tool_choice, reasoning: str, parallel_tool_calls: bool):
    """The forced call: one commentary message to the function with JSON arguments, ended by <|call|> (which ends the
    turn). No analysis message first: one of unbounded length let a weak model write it until max_tokens and never
    call. "auto" is not constrained."""
    from xgrammar.structural_tag import OrFormat, StructuralTag, TagFormat

    from .. import structural_tags as st
    from ..errors import FlashMoeError

    if not (tool_choice == "required" or isinstance(tool_choice, dict)):
        raise FlashMoeError("harmony tool calls are constrained only when forced (tool_choice required or named)")
    calls = [TagFormat(begin=f"<|channel|>commentary to=functions.{t['function']['name']} <|constrain|>json<|message|>",
                       content=st.json_value(st.parameters_of(t), ["<|call|>"]), end="<|call|>")
             for t in st.chosen(tools, tool_choice)]
    return StructuralTag(format=calls[0] if len(calls) == 1 else OrFormat(elements=calls))

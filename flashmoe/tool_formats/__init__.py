"""Tool-call formats, one module per way a family writes its calls, read off the chat template (`detect`) and found
by name (`get`). Each module has: NAME; CALL_BEGIN and CALL_END, the markers around one call in the reply (CALL_END
None: the calls run to the end of the text); SECTION, markup around the calls that the reply's text leaves out;
MARKUP, more markers its parser reads; `detect(template)` (True, False, or None: the family's calls, in a form not
read: the template is taken as taking no tools); `parse(block, raw_arguments)`, a call's text -> ToolCalls, or None
if it is not one; `grammar(tools, tool_choice, reasoning, parallel_tool_calls)`, the xgrammar structural tag that
writes calls exactly as the template does (structural_tags.py holds the parts they share).

  json      Qwen3, Qwen3-Next              <tool_call>{"name", "arguments"}</tool_call>
  xml       Qwen3.5, Qwen3-Coder           <tool_call><function=NAME><parameter=KEY>VALUE</parameter>...
  glm       GLM-4.5                        <tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>...
  deepseek  DeepSeek-V3.1                  a section of NAME<｜tool▁sep｜>{...} calls
  deepseek_fenced  DeepSeek-V3, R1         a section of function<｜tool▁sep｜>NAME and a ```json block, a newline apart
  kimi      Kimi-K2                        a section of functions.NAME:INDEX<|tool_call_argument_begin|>{...} calls
  minimax   MiniMax-M2                     <minimax:tool_call><invoke name="NAME"><parameter name="KEY">...
  mistral   Mixtral/Mistral                [TOOL_CALLS] [{"name", "arguments"}, ...] to the end of the turn
  harmony   GPT-OSS                        harmony channels (harmony.py parses the whole reply)
"""

from __future__ import annotations

from types import ModuleType

from . import deepseek, deepseek_fenced, glm, harmony, kimi, minimax, mistral, qwen_json, qwen_xml
from .common import THINK_BEGIN, THINK_END

# in the order a template is tried: a more specific marker before one it contains (xml's <tool_call> is json's too)
FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (harmony, minimax, kimi, mistral, deepseek, deepseek_fenced, glm,
                                                     qwen_xml, qwen_json)}


def detect(template: str | None) -> str | None:
    """The format of the calls a chat template writes, or None (it takes no tools, or writes them in a form not read)."""
    if not template or "tools" not in template:
        return None
    for fmt in FORMATS.values():
        found = fmt.detect(template)
        if found is None:
            return None
        if found:
            return fmt.NAME
    return None


def get(name: str) -> ModuleType:
    return FORMATS[name]


def markers(name: str | None) -> tuple[str, ...]:
    """The markup the output parsers read, for IncrementalDecoder to keep where the tokenizer makes it special (no
    format: Qwen's, whose <think> a template without tools still writes)."""
    fmt = FORMATS.get(name, qwen_json)
    if hasattr(fmt, "MARKERS"):
        return fmt.MARKERS
    return tuple(m for m in (THINK_BEGIN, THINK_END, fmt.CALL_BEGIN, fmt.CALL_END, *fmt.SECTION, *fmt.MARKUP) if m)

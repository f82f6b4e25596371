"""Constrained decoding with xgrammar: output that must follow a JSON schema or a tool-call format.

Each step, the grammar masks the logits to the tokens that keep the output valid, so a JSON answer always
parses and a forced tool call always names a real tool with arguments that match its schema, whatever the
quantization does to the model's preferences. When the grammar is complete only the stop tokens remain.
"""

from __future__ import annotations

import threading
from typing import Literal

import torch

from .chat import THINK_BEGIN, THINK_END
from .errors import FlashMoeError

Reasoning = Literal["enabled", "disabled", "auto"]
# the tool-call formats xgrammar knows by these names: Qwen3/Qwen3-Next JSON, Qwen3.5 XML parameters
XGRAMMAR_TOOL_FORMATS = {"json": "qwen_3", "xml": "qwen_3_5"}
# longest run of whitespace allowed between JSON elements: room for pretty-printing, while a weak (or 2-bit)
# model cannot loop on newlines until max_tokens and leave output that does not parse
MAX_WHITESPACE_RUN = 16


def reasoning_mode(prompt_text: str, template_thinks: bool) -> Reasoning:
    """What the output may start with: the rest of a think block the prompt opened ("enabled"), nothing of the
    kind when the prompt closed it ("disabled"), or a think block of the model's choosing ("auto")."""
    tail = prompt_text.rstrip()
    if tail.endswith(THINK_BEGIN):
        return "enabled"
    if tail.endswith(THINK_END) or not template_thinks:
        return "disabled"
    return "auto"


class GrammarConstraint:
    """One request's grammar state: masks logits before sampling and advances on each chosen token."""

    def __init__(self, compiled, vocab_size: int, banned_token_ids: list[int]):
        import xgrammar as xgr

        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._banned = torch.tensor(banned_token_ids, dtype=torch.long)

    def mask(self, logits: torch.Tensor) -> None:
        """logits: float32 [vocab] on the CPU, masked in place (disallowed tokens become -inf)."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        self._xgr.apply_token_bitmask_inplace(logits.view(1, -1), self._bitmask)
        logits[self._banned] = float("-inf")

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise FlashMoeError(f"token {token} breaks the output grammar (a masked token was sampled)")

    @property
    def finished(self) -> bool:
        return self._matcher.is_terminated()


class Grammars:
    """One per model: the tokenizer's vocabulary as xgrammar sees it, and a compiler that caches grammars."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        try:
            import xgrammar as xgr
        except ImportError as exc:
            raise FlashMoeError("structured output needs xgrammar: pip install xgrammar") from exc
        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        # xgrammar reads a control token such as <|im_start|> as its literal text, which a JSON string would
        # accept; decoding drops it, so the text would not be what the grammar checked. Control tokens other
        # than the stop tokens are never allowed in constrained output.
        self.banned_token_ids = sorted(i for i, t in tokenizer.added_tokens_decoder.items()
                                       if t.special and i not in stop_token_ids and i < vocab_size)
        self._compiler = xgr.GrammarCompiler(info)
        self._lock = threading.Lock()  # requests compile from several threads; the compiler's cache is shared

    def json(self, schema: dict | None, reasoning: Reasoning) -> GrammarConstraint:
        """Any JSON object (schema None, OpenAI's json_object) or one matching `schema` (json_schema)."""
        from xgrammar.structural_tag import JSONSchemaFormat, SequenceFormat, StructuralTag

        body = JSONSchemaFormat(json_schema=schema if schema is not None else {"type": "object"},
                                max_whitespace_cnt=MAX_WHITESPACE_RUN)
        prefix = self._reasoning_prefix(reasoning)
        tag = StructuralTag(format=body if prefix is None else SequenceFormat(elements=[prefix, body]))
        return self._constraint(tag, "response_format schema")

    def tool_calls(self, tool_format: str, tools: list[dict], tool_choice, reasoning: Reasoning,
                   parallel_tool_calls: bool) -> GrammarConstraint:
        """Text and tool calls in the model's own format; "required" or a named function forces a call."""
        try:
            tag = self._xgr.get_model_structural_tag(
                XGRAMMAR_TOOL_FORMATS[tool_format], tools=tools, tool_choice=tool_choice, reasoning=reasoning,
                parallel_tool_calls=parallel_tool_calls, max_whitespace_cnt=MAX_WHITESPACE_RUN)
        except ValueError as exc:
            raise FlashMoeError(f"tools: {exc}") from exc
        return self._constraint(tag, "tool parameters schema")

    def _constraint(self, tag, what: str) -> GrammarConstraint:
        try:
            with self._lock:
                compiled = self._compiler.compile_structural_tag(tag)
        except Exception as exc:  # xgrammar raises several types for a schema it cannot use
            raise FlashMoeError(f"invalid {what}: {exc}") from exc
        return GrammarConstraint(compiled, self.vocab_size, self.banned_token_ids)

    @staticmethod
    def _reasoning_prefix(reasoning: Reasoning):
        """A think block before the constrained part: its rest ("enabled"), optional ("auto") or none."""
        if reasoning == "disabled":
            return None
        from xgrammar.structural_tag import AnyTextFormat, ConstStringFormat, OptionalFormat, SequenceFormat, TagFormat

        block = TagFormat(begin="" if reasoning == "enabled" else THINK_BEGIN,
                          content=AnyTextFormat(excludes=[THINK_BEGIN, THINK_END]), end=THINK_END)
        block = SequenceFormat(elements=[block, ConstStringFormat(value="\n\n")])
        return OptionalFormat(content=block) if reasoning == "auto" else block

"""Constrained decoding with xgrammar: output that must follow a JSON schema or a tool-call format.

Each step, the grammar masks the logits to the tokens that keep the output valid, so a JSON answer always
parses and a forced tool call always names a real tool with arguments that match its schema, whatever the
quantization does to the model's preferences. When the grammar is complete only the stop tokens remain.
What the output may look like is spelled out in structural_tags.py; here it is compiled (and cached) and run.
"""

from __future__ import annotations

import threading
from typing import Literal

import torch

from .chat import THINK_BEGIN, THINK_END
from .errors import FlashMoeError

Reasoning = Literal["enabled", "disabled", "auto"]
# compiled grammars are cached for reuse, one per distinct schema or tool set: about 0.43 MB each over a 150k
# vocabulary (issue 18 measured +172 MB over 400 requests with distinct schemas, without a bound). 64 MB keeps
# the last ~150, far more than a server's clients reuse at once, and bounds the memory whatever they send.
GRAMMAR_CACHE_BYTES = 64 << 20


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

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int],
                 cache_limit_bytes: int = GRAMMAR_CACHE_BYTES):
        try:
            import xgrammar as xgr
        except ImportError as exc:
            raise FlashMoeError("structured output needs xgrammar: pip install xgrammar") from exc
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        # xgrammar reads a control token such as <|im_start|> as its literal text, which a JSON string would
        # accept; decoding drops it, so the text would not be what the grammar checked. Control tokens other
        # than the stop tokens are never allowed in constrained output.
        self.banned_token_ids = sorted(i for i, t in tokenizer.added_tokens_decoder.items()
                                       if t.special and i not in stop_token_ids and i < vocab_size)
        self._compiler = xgr.GrammarCompiler(info, cache_limit_bytes=cache_limit_bytes)
        self._lock = threading.Lock()  # requests compile from several threads; the compiler's cache is shared

    @property
    def cache_bytes(self) -> int:
        """What the compiled grammars kept for reuse take now (xgrammar's estimate)."""
        return self._compiler.get_cache_size_bytes()

    def json(self, schema: dict | None, reasoning: Reasoning) -> GrammarConstraint:
        """Any JSON object (schema None, OpenAI's json_object) or one matching `schema` (json_schema)."""
        from .structural_tags import json_output  # imports xgrammar, which is optional until a grammar is needed

        return self._constraint(lambda: json_output(schema, reasoning), "response_format schema")

    def tool_calls(self, tool_format: str, tools: list[dict], tool_choice, reasoning: Reasoning,
                   parallel_tool_calls: bool) -> GrammarConstraint:
        """Text and tool calls in the model's own format; "required" or a named function forces a call."""
        from .structural_tags import tool_calls

        return self._constraint(lambda: tool_calls(tool_format, tools, tool_choice, reasoning, parallel_tool_calls),
                                "tool parameters schema")

    def _constraint(self, make_tag, what: str) -> GrammarConstraint:
        try:
            tag = make_tag()
            with self._lock:
                compiled = self._compiler.compile_structural_tag(tag)
        except FlashMoeError:
            raise
        except Exception as exc:  # xgrammar (and pydantic, building the tag) raise several types for a bad schema
            raise FlashMoeError(f"invalid {what}: {exc}") from exc
        return GrammarConstraint(compiled, self.vocab_size, self.banned_token_ids)

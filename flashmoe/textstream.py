"""From token ids to text as they stream: incremental decoding and stop strings.

Decoding one token at a time breaks multi-byte characters and the spaces that byte-level BPE merges; so
each step decodes a short window of recent tokens and emits only what that window adds, once it no
longer ends in an incomplete character (the approach of vLLM's detokenizer).
"""

from __future__ import annotations


class IncrementalDecoder:
    def __init__(self, tokenizer, skip_token_ids: set[int] = frozenset(), markers: tuple[str, ...] = ()):
        """markers: the output format's markup (chat.format_markers), kept in the text even where the tokenizer makes
        them special tokens (harmony's always; DeepSeek's or Kimi's tool-call markers in some releases), which
        decoding would otherwise drop; every other special token is dropped, as before."""
        self.tokenizer = tokenizer
        self.skip = set(skip_token_ids)
        self.keep_special = False
        special = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
        kept = {i for i in special if tokenizer.convert_ids_to_tokens(i) in set(markers)}
        if kept:  # decode specials, and drop the ones that are not markup ourselves
            self.keep_special = True
            self.skip |= (special | set(getattr(tokenizer, "all_special_ids", ()))) - kept
        self.ids: list[int] = []
        self._prefix = 0  # window start: decoded text of ids[_prefix:_read] was already emitted
        self._read = 0

    def add(self, token: int) -> str:
        """New text that `token` completes ('' while a character is still incomplete)."""
        if token in self.skip:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """At the end: whatever is still held back (an unfinished character decodes as U+FFFD)."""
        rest = self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
        self._prefix = self._read = len(self.ids)
        return rest

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=not self.keep_special)


class StopStrings:
    """Cuts the text at the first stop string; holds back an ending that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self._pending += text
        hits = [(i, s) for s in self.stops if (i := self._pending.find(s)) >= 0]
        if hits:
            self.stopped = True
            self.matched = min(hits)[1]
            out, self._pending = self._pending[:min(hits)[0]], ""
            return out
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(self._pending)), 0, -1)
                    if s.startswith(self._pending[-n:])), default=0)
        out, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        return out

    def close(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

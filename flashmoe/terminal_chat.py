"""`flashmoe chat`: a conversation in the terminal. Replies stream as they are made (reasoning dimmed on
stderr, the answer on stdout); the history is re-rendered with the checkpoint's template each turn."""

from __future__ import annotations

import sys

from .chat import ChatFormat, OutputParser
from .errors import FlashMoeError
from .grammar import reasoning_mode
from .textstream import IncrementalDecoder

HELP = "/reset clears the history, /exit leaves (or Ctrl-D); Ctrl-C stops a reply"


class TerminalChat:
    def __init__(self, model, console, system: str | None, max_tokens: int, temperature: float, top_p: float,
                 thinking: bool):
        self.model, self.console = model, console
        self.format = ChatFormat(model.tokenizer)
        self.system = system
        self.max_tokens, self.temperature, self.top_p = max_tokens, temperature, top_p
        self.template_kwargs = {"enable_thinking": thinking} if self.format.thinks else {}
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def run(self) -> None:
        self.console.print(f"chatting with {self.model.store.path.name}; {HELP}", style="dim")
        while True:
            try:
                line = input("you> ")
            except EOFError:
                sys.stdout.write("\n")
                return
            command = line.strip()
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                self.reset()
                self.console.print("history cleared", style="dim")
                continue
            if not command:
                continue
            try:
                self.turn(line)
            except FlashMoeError as exc:
                self.messages.pop()  # the turn that failed is not kept
                self.console.print(f"[bold red]error:[/] {exc}", highlight=False)

    def turn(self, user_text: str) -> None:
        from .cli import stats_line

        self.messages.append({"role": "user", "content": user_text})
        prompt = self.format.render(self.messages, **self.template_kwargs)
        ids = self.format.encode(prompt)
        limit = self.model.config.max_position_embeddings
        if len(ids) >= limit:
            raise FlashMoeError(f"the conversation is {len(ids)} tokens, the model's context {limit}; /reset")
        parser = OutputParser(prompt_opened_think=reasoning_mode(prompt, self.format.thinks) == "enabled",
                              parse_reasoning=self.format.thinks)
        decoder = IncrementalDecoder(self.model.tokenizer, skip_token_ids=set(self.model.eos_token_ids))
        self.model.reset_stats()
        reply = []
        sys.stdout.write("model> ")
        tokens = self.model.generate(ids, min(self.max_tokens, limit - len(ids)), self.temperature, self.top_p)
        try:
            for token in tokens:
                reply.append(self._show(parser.feed(decoder.add(token))))
        except KeyboardInterrupt:
            tokens.close()
            self.console.print(" [stopped]", style="dim")
        reply.append(self._show(parser.feed(decoder.flush())))
        reply.append(self._show(parser.close()))
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.messages.append({"role": "assistant", "content": "".join(reply)})
        stats = self.model.stats
        self.console.print(f"turn {sum(m['role'] == 'user' for m in self.messages)}, {len(ids)} prompt tokens | "
                           + stats_line(stats), style="dim")

    def _show(self, delta) -> str:
        if delta.reasoning:
            self.console.print(delta.reasoning, style="dim italic", end="")
        if delta.content:
            sys.stdout.write(delta.content)
            sys.stdout.flush()
        return delta.content

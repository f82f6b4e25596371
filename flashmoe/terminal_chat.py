"""`flashmoe chat`: a conversation in the terminal. Replies stream as they are made (reasoning dimmed on
stderr, the answer on stdout); the history is re-rendered with the checkpoint's template each turn.

At a terminal the input is read with prompt_toolkit: the terminal is in raw mode, so a message is not cut at
the tty's 4095-byte line limit, a bracketed paste of many lines is one message, and there is line editing and
history. Piped input (scripts, tests) is read a line at a time, one line one turn."""

from __future__ import annotations

import sys

from rich.text import Text

from .chat import ChatFormat, OutputParser
from .errors import FlashMoeError
from .grammar import reasoning_mode
from .textstream import IncrementalDecoder

COMMANDS = ("/reset", "/help", "/exit", "/quit")
HELP = ("Enter sends, Esc-Enter (Alt-Enter) adds a line, a paste keeps its lines, Up/Down recall; "
        "/reset clears the history, /help, /exit (or Ctrl-D); Ctrl-C stops a reply or clears the line")


class LineReader:
    """Reads stdin a line at a time with input(): for piped input, where there is no terminal to edit on."""

    def read(self) -> str:
        return input("you> ")  # EOFError at the end of the input


class PromptReader:
    """prompt_toolkit's prompt with in-memory history. input/output default to the terminal; tests pass a
    pipe input and a DummyOutput."""

    def __init__(self, input=None, output=None):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        bindings = KeyBindings()

        # Alt-Enter arrives as Esc then Enter; prompt_toolkit's default binds it to accept, ours wins (added last)
        @bindings.add("escape", "enter")
        def _newline(event) -> None:
            event.current_buffer.insert_text("\n")

        self.session = PromptSession(history=InMemoryHistory(), key_bindings=bindings, input=input, output=output,
                                     prompt_continuation=_continuation)

    def read(self) -> str:
        return self.session.prompt("you> ")  # EOFError on Ctrl-D, KeyboardInterrupt on Ctrl-C


def _continuation(width: int, line_number: int, wrap_count: int) -> str:
    return "...  " if wrap_count == 0 else "     "  # marks a new line of the message, not a wrapped one


def terminal_reader() -> LineReader | PromptReader:
    if not sys.stdin.isatty():
        return LineReader()
    from prompt_toolkit.output import create_output

    # the prompt is drawn on whichever of stdout/stderr is a terminal, so `chat > log` still edits on screen
    return PromptReader(output=create_output(always_prefer_tty=True))


class TerminalChat:
    def __init__(self, model, console, system: str | None, max_tokens: int, temperature: float, top_p: float,
                 thinking: bool, reader: LineReader | PromptReader | None = None):
        self.model, self.console = model, console
        self.reader = reader if reader is not None else terminal_reader()
        self.format = ChatFormat(model.tokenizer)
        self.system = system
        self.max_tokens, self.temperature, self.top_p = max_tokens, temperature, top_p
        self.template_kwargs = {"enable_thinking": thinking} if self.format.thinks else {}
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def run(self) -> None:
        self._say(f"chatting with {self.model.store.path.name}; {HELP}", "dim")
        while True:
            try:
                text = self.reader.read()
            except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line and asks again, as a shell does
                continue
            except EOFError:
                sys.stdout.write("\n")
                return
            command = text.strip()
            if not command:
                continue
            if command.startswith("/"):
                if command in ("/exit", "/quit"):
                    return
                self._command(command)
                continue
            try:
                self.turn(text)
            except FlashMoeError as exc:
                self.messages.pop()  # the turn that failed is not kept
                self.console.print(Text.assemble(("error:", "bold red"), f" {exc}"))

    def _command(self, command: str) -> None:
        """Everything that starts with '/' is a command; one we do not know is refused, never sent to the model
        (a mistyped /rest would otherwise become a turn of the conversation)."""
        if command == "/reset":
            self.reset()
            self._say("history cleared", "dim")
        elif command == "/help":
            self._say(HELP, "dim")
        else:
            self._say(f"unknown command {command.split()[0]}; the commands are {', '.join(COMMANDS)}", "yellow")

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
        reply, stopped = [], False
        sys.stdout.write("model> ")
        # with a prefix cache, the state at the end of the history is kept too: the next turn re-renders this reply
        # (its thinking dropped) and branches there, prefilling only the new message and the reply
        keep_at = self.format.branch_points(ids, self.messages, **self.template_kwargs) \
            if self.model.prefix_cache is not None else ()
        tokens = self.model.generate(ids, min(self.max_tokens, limit - len(ids)), self.temperature, self.top_p,
                                     keep_at=keep_at)
        try:
            for token in tokens:
                reply.append(self._show(parser.feed(decoder.add(token))))
        except KeyboardInterrupt:  # Ctrl-C stops this reply; what was said so far is kept, the chat goes on
            tokens.close()
            stopped = True
        reply.append(self._show(parser.feed(decoder.flush())))
        reply.append(self._show(parser.close()))
        if stopped:
            sys.stdout.flush()  # the mark goes to stderr: after the reply's text, not before it
            self._say(" [stopped]", "dim", end="")
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.messages.append({"role": "assistant", "content": "".join(reply)})
        stats = self.model.stats
        self._say(f"turn {sum(m['role'] == 'user' for m in self.messages)}, {len(ids)} prompt tokens | "
                  + stats_line(stats), "dim")

    def _show(self, delta) -> str:
        if delta.reasoning:
            self._say(delta.reasoning, "dim italic", end="")
        if delta.content:
            sys.stdout.write(delta.content)
            sys.stdout.flush()
        return delta.content

    def _say(self, text: str, style: str, end: str = "\n") -> None:
        """Print on the console as the characters they are: a Text is never read as Rich markup ('[stopped]'
        would vanish as an unknown tag), never highlighted and never given emoji for ':codes:'."""
        self.console.print(Text(text, style=style), end=end, soft_wrap=True)

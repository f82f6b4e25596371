"""`flashmoe chat` as a person at a terminal uses it: keys go through prompt_toolkit (a pipe input and a
DummyOutput stand in for the terminal), replies and messages print as the characters they are."""

from __future__ import annotations

import copy
import io
import sys

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

import flashmoe
from flashmoe import cli
from flashmoe.errors import FlashMoeError
from flashmoe.terminal_chat import PromptReader, TerminalChat

PASTE_START, PASTE_END, UP, CTRL_C, CTRL_D = "\x1b[200~", "\x1b[201~", "\x1b[A", "\x03", "\x04"


@pytest.fixture(scope="module")
def model(built):
    m = flashmoe.load(built.store("qwen3_5_moe", 4), cache_gb=0.01)
    yield m
    m.close()


@pytest.fixture
def generate_calls(model, monkeypatch):
    """Every prompt the chat sends to the model; the model itself still answers."""
    calls, real = [], model.generate
    monkeypatch.setattr(model, "generate", lambda ids, *a, **k: (calls.append(ids), real(ids, *a, **k))[1])
    return calls


class Typist(PromptReader):
    """Types one chunk of keys at each prompt, as a person does: keys sent before a prompt starts would race
    its loading of the history. Ctrl-D after the last chunk; a prompt past that fails the test, never hangs."""

    def __init__(self, pipe, chunks: list[str]):
        super().__init__(input=pipe, output=DummyOutput())
        self.pipe, self.chunks = pipe, [*chunks, CTRL_D]

    def read(self) -> str:
        self.pipe.send_text(self.chunks.pop(0))
        return super().read()


def chat_with_keys(model, *chunks: str, thinking: bool = False) -> tuple[TerminalChat, str]:
    """Type each chunk of keys at one prompt of a chat; returns the chat and what its console printed."""
    console = Console(file=io.StringIO(), width=100)
    with create_pipe_input() as pipe:
        chat = TerminalChat(model, console, None, 2, 0.0, 1.0, thinking, reader=Typist(pipe, list(chunks)))
        try:
            chat.run()
        except KeyboardInterrupt:  # let through, it would stop the whole pytest session
            pytest.fail("a Ctrl-C ended the chat")
    return chat, console.file.getvalue()


def user_messages(chat: TerminalChat) -> list[str]:
    return [m["content"] for m in chat.messages if m["role"] == "user"]


def test_bracketed_paste_of_three_lines_is_one_message(model, generate_calls):
    chat, _ = chat_with_keys(model, f"{PASTE_START}a\nb\nc{PASTE_END}\r")
    assert user_messages(chat) == ["a\nb\nc"] and len(generate_calls) == 1


def test_esc_enter_adds_a_line_and_enter_sends(model, generate_calls):
    chat, _ = chat_with_keys(model, "first\x1b\rsecond\r")
    assert user_messages(chat) == ["first\nsecond"]


def test_a_line_longer_than_the_tty_limit_arrives_whole(model, monkeypatch):
    turns = []  # the tiny model's context is shorter than the line: record what reaches a turn, not the reply
    monkeypatch.setattr(TerminalChat, "turn", lambda self, text: turns.append(text))
    line = "".join("abcdefghij"[i % 10] for i in range(10_000))  # the tty's canonical mode cuts at 4095
    chat_with_keys(model, line + "\r")
    assert turns == [line]


def test_up_arrow_recalls_the_previous_message(model, generate_calls):
    chat, _ = chat_with_keys(model, "Hello there\r", f"{UP}\r")
    assert user_messages(chat) == ["Hello there", "Hello there"] and len(generate_calls) == 2


def test_ctrl_c_at_the_prompt_clears_the_line_and_asks_again(model, generate_calls):
    chat, _ = chat_with_keys(model, f"never sent{CTRL_C}", "Hello\r")
    assert user_messages(chat) == ["Hello"] and len(generate_calls) == 1


def test_unknown_command_is_refused_and_never_sent(model, generate_calls):
    chat, printed = chat_with_keys(model, "/rest\r", "/reset now\r", "/help\r")
    assert chat.messages == [] and generate_calls == []
    assert "unknown command /rest; the commands are /reset, /help, /exit, /quit" in printed
    assert "unknown command /reset;" in printed  # a command takes nothing after it
    assert "Esc-Enter" in printed.split("unknown command")[-1]  # /help printed the help line


def fake_reply(model, monkeypatch, text: str, then: BaseException | None = None) -> None:
    """The model 'says' text, token by token (then raises `then`, as Ctrl-C in the middle of a reply does)."""
    ids = model.tokenizer.encode(text, add_special_tokens=False)

    def generate(prompt_ids, *args, **kwargs):
        yield from ids
        if then is not None:
            raise then

    monkeypatch.setattr(model, "generate", generate)


def test_reasoning_and_content_print_verbatim_not_as_markup(model, monkeypatch, capsys):
    # real vocabularies have bracket tokens; here whole tags are single tokens, so one printed piece holds one
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.add_tokens(["[bold]", "[/bold]", ":smile:", "[red]", "[/red]"])
    monkeypatch.setattr(model, "_tokenizer", tokenizer)
    fake_reply(model, monkeypatch, "[bold]x[/bold] :smile:</think>[red]y[/red] [link=z]w")
    chat, printed = chat_with_keys(model, "hi\r", thinking=True)
    assert "[bold]x[/bold] :smile:" in printed  # reasoning, on the console
    assert "[red]y[/red] [link=z]w" in capsys.readouterr().out  # the answer, on stdout
    assert chat.messages[-1]["content"] == "[red]y[/red] [link=z]w"


def test_ctrl_c_during_a_reply_stops_it_and_the_next_turn_works(model, monkeypatch, capsys):
    real_generate, calls = model.generate, []

    def generate(ids, *args, **kwargs):  # the first reply: Ctrl-C lands in the engine's generator after a token
        calls.append(ids)
        tokens = real_generate(ids, *args, **kwargs)
        yield next(tokens)
        if len(calls) == 1:
            tokens.throw(KeyboardInterrupt())
        yield from tokens

    monkeypatch.setattr(model, "generate", generate)
    chat, printed = chat_with_keys(model, "first\r", "second\r")
    assert printed.count(" [stopped]") == 1 and "turn 2," in printed  # the second turn ran to its end
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert user_messages(chat) == ["first", "second"]
    assert capsys.readouterr().out.count("model> ") == 2


def test_errors_print_their_brackets(model, monkeypatch):
    def generate(prompt_ids, *args, **kwargs):
        raise FlashMoeError("cannot read /data/[shard 2]/experts.bin")
        yield

    monkeypatch.setattr(model, "generate", generate)
    chat, printed = chat_with_keys(model, "hi\r")
    assert "error: cannot read /data/[shard 2]/experts.bin" in printed and chat.messages == []


def test_cli_errors_print_their_brackets(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["flashmoe", "info", "/no/such/[x]/store"])
    with pytest.raises(SystemExit):
        cli.main()
    assert "/no/such/[x]/store" in capsys.readouterr().err


def test_piped_input_is_one_line_one_turn(model, generate_calls, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\n/nope\n"))
    chat = TerminalChat(model, Console(file=io.StringIO()), None, 2, 0.0, 1.0, False)  # stdin is no terminal
    chat.run()
    assert user_messages(chat) == ["one", "two"] and len(generate_calls) == 2


def test_a_chats_next_turn_resumes_from_the_prefix_cache(built, monkeypatch):
    with flashmoe.load(built.store("qwen3_5_moe", 4), prefix_cache_gb=0.05) as cached:
        monkeypatch.setattr(sys, "stdin", io.StringIO("tell me about the sea\nand the mountains\n"))
        chat = TerminalChat(cached, Console(file=io.StringIO()), None, 4, 0.0, 1.0, False)
        chat.run()
        assert user_messages(chat) == ["tell me about the sea", "and the mountains"]
        assert cached.stats["prefix_hits"] == 1 and cached.stats["prefix_tokens_saved"] > 0  # the second turn's

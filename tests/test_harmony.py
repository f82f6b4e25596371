"""GPT-OSS's harmony replies: reasoning, content and tool calls split as they stream, on their own and through the
server (a scripted reply in the tiny GPT-OSS model's own tokens, read back by the official openai client)."""

from __future__ import annotations

import json

import pytest

from flashmoe.chat import ChatFormat, ParsedDelta, detect_tool_format, is_harmony
from flashmoe.harmony import HarmonyParser
from flashmoe.tiny_templates import GPT_OSS_CHAT_TEMPLATE, QWEN3_5_CHAT_TEMPLATE
from server_harness import MODEL_NAME, RunningServer

REPLY = ("<|channel|>analysis<|message|>The user wants Paris's weather.<|end|>"
         "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
         '{"city": "Paris", "unit": "C"}<|call|>')
ANSWER = ("<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>"
          "It is sunny, 21 C.<|return|>")


def parse(text: str, step: int) -> ParsedDelta:
    """The text fed `step` characters at a time (markers split anywhere), then closed."""
    parser, out = HarmonyParser(), ParsedDelta()
    for i in range(0, len(text), step):
        d = parser.feed(text[i:i + step])
        out = ParsedDelta(out.reasoning + d.reasoning, out.content + d.content, out.tool_calls + d.tool_calls)
    d = parser.close()
    return ParsedDelta(out.reasoning + d.reasoning, out.content + d.content, out.tool_calls + d.tool_calls)


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_channels_and_calls_split_however_the_text_arrives(step):
    d = parse(REPLY, step)
    assert d.reasoning == "The user wants Paris's weather." and d.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in d.tool_calls] == [("get_weather", {"city": "Paris", "unit": "C"})]
    d = parse(ANSWER, step)
    assert (d.reasoning, d.content, d.tool_calls) == ("Easy.", "It is sunny, 21 C.", [])


def test_the_recipient_after_the_role_a_preamble_and_plain_text():
    # the recipient may follow the role; a commentary message to no one is a preamble, shown as content
    d = parse('<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant to=functions.f<|channel|>commentary'
              ' json<|message|>{}<|call|>', 2)
    assert d.content == "Checking." and [(c.name, c.arguments) for c in d.tool_calls] == [("f", "{}")]
    assert parse("  no headers at all", 4).content == "no headers at all"  # a model that writes none still answers
    # arguments that are not a JSON object stay visible as content, not lost
    d = parse("<|channel|>commentary to=functions.f <|constrain|>json<|message|>{not json<|call|>", 5)
    assert d.tool_calls == [] and d.content == "{not json"
    # a reply cut short in its final message keeps what came
    assert parse("<|channel|>final<|message|>Half an ans", 3).content == "Half an ans"


def test_harmony_templates_are_recognised():
    assert is_harmony(GPT_OSS_CHAT_TEMPLATE) and not is_harmony(QWEN3_5_CHAT_TEMPLATE)
    assert detect_tool_format(GPT_OSS_CHAT_TEMPLATE) == "harmony"


# bounded values, so the random model held to a grammar finishes its call (a free string it writes until max_tokens)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
                                               "required": ["city"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "set_alarm", "description": "Set an alarm", "parameters": {
             "type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
             "required": ["hour"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def gpt_oss_server(built, tmp_path_factory):
    from flashmoe.convert import convert

    # a context long enough for the tools' listing in the tiny vocabulary (the default tiny one has 128 positions)
    store = convert(built.checkpoint("gpt_oss", max_position_embeddings=2048), tmp_path_factory.mktemp("oss") / "s",
                    bits=4)
    s = RunningServer(store, cache_gb=0.01)
    yield s
    s.close()


class Scripted:
    """A Sequence (flashmoe/sequence.py) that makes `ids` whatever the logits say: the forward still runs each step."""

    greedy = False  # it picks its own tokens (Model.step takes a batch's argmax only for greedy sequences)

    def __init__(self, model, ids: list[int]):
        self.state, self.ids = model.new_state(), list(ids)
        self.prompt_done, self.done, self.generated = True, False, 0

    def begin(self) -> list[int]:
        return [self.ids[0]]

    def advance(self, logits) -> int:
        token = self.ids.pop(0)
        self.generated += 1
        self.done = not self.ids
        return token

    def close(self) -> None:
        pass


def scripted(server, monkeypatch, text: str):
    """The model's replies replaced by `text` in its own tokens (markers as special tokens)."""
    ids = server.model.tokenizer.encode(text, add_special_tokens=False)
    monkeypatch.setattr(server.model, "sequence", lambda *args, **kwargs: Scripted(server.model, ids))


def test_the_server_returns_reasoning_and_tool_calls_from_a_harmony_reply(gpt_oss_server, monkeypatch):
    assert ChatFormat(gpt_oss_server.model.tokenizer).harmony
    client = gpt_oss_server.client()
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    scripted(gpt_oss_server, monkeypatch, REPLY)
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, max_tokens=400)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and not message.content
    assert message.model_extra["reasoning_content"] == "The user wants Paris's weather."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"})]
    # streamed: the same, in deltas
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, max_tokens=400,
                                                 stream=True))
    calls = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])] if chunks else []
    assert calls and calls[0].function.name == "get_weather"
    # the call and its result go back through the template; the model's final answer is content
    messages += [message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "sunny, 21 C"}]
    scripted(gpt_oss_server, monkeypatch, ANSWER)
    r2 = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, max_tokens=400)
    assert r2.choices[0].message.content == "It is sunny, 21 C." and r2.usage.prompt_tokens > r.usage.prompt_tokens
    assert r2.choices[0].message.model_extra["reasoning_content"] == "Easy."


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_is_written_in_harmony_and_matches_its_schema(gpt_oss_server, choice):
    """The random model, held to the grammar: one call to the function, arguments valid for its schema, the turn
    ended by <|call|>."""
    import jsonschema

    r = gpt_oss_server.client().chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, tool_choice=choice,
        max_tokens=300, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls"
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and (choice == "required" or calls[0].function.name == "get_weather")
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == calls[0].function.name)
    jsonschema.validate(json.loads(calls[0].function.arguments), schema)

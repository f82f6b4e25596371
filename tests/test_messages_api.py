"""Anthropic's Messages API, driven by the official anthropic client against a real server: the same greedy text as
the OpenAI API for the same conversation, the documented stream, tool_use / tool_result turns constrained to their
schemas, count_tokens, and errors in Anthropic's shape."""

from __future__ import annotations

import jsonschema
import pytest
from server_harness import MODEL_NAME, NO_THINKING, RunningServer, post_raw

anthropic = pytest.importorskip("anthropic")

WEATHER = {"name": "get_weather", "description": "Weather forecast", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}
NO_THINK = {"thinking": {"type": "disabled"}}
GREEDY = {"temperature": 0, **NO_THINK}  # anthropic 2.x's create() no longer takes temperature: sent as extra_body


@pytest.fixture(scope="module")
def server(built):
    s = RunningServer(built.store("qwen3_5_moe", 4), api_key="sekrit", cache_gb=0.01, max_active=2)
    yield s
    s.close()


def client(server, key: str = "sekrit"):
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0)


def test_text_matches_the_openai_api_plain_and_streamed(server):
    question = "Hello world! What is the capital of France?"
    openai_text = server.client("sekrit").chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}],
        max_tokens=12, temperature=0, extra_body=NO_THINKING).choices[0].message.content
    c = client(server)
    r = c.messages.create(model=MODEL_NAME, max_tokens=12, system=[{"type": "text", "text": "Be brief."}],
                          messages=[{"role": "user", "content": question}], extra_body=GREEDY)
    assert r.type == "message" and r.role == "assistant" and r.model == MODEL_NAME and r.id.startswith("msg_")
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == openai_text
    assert r.stop_reason in ("end_turn", "max_tokens") and 1 <= r.usage.output_tokens <= 12
    with c.messages.stream(model=MODEL_NAME, max_tokens=12, system="Be brief.",
                           messages=[{"role": "user", "content": question}], extra_body=GREEDY) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == openai_text and final.content[0].text == openai_text
    assert final.stop_reason == r.stop_reason and final.usage.output_tokens == r.usage.output_tokens
    count = c.messages.count_tokens(model=MODEL_NAME, system="Be brief.", messages=[{"role": "user", "content": question}],
                                    extra_body=NO_THINK)
    assert count.input_tokens == r.usage.input_tokens


def test_stop_sequences_name_the_one_that_stopped(server):
    c = client(server)
    ask = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Count: one two three"}], extra_body=GREEDY)
    full = c.messages.create(max_tokens=24, **ask).content[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    r = c.messages.create(max_tokens=24, stop_sequences=[stop, "never-said"], **ask)
    assert (r.stop_reason, r.stop_sequence) == ("stop_sequence", stop) and full.startswith(r.content[0].text)


def test_tool_use_round_trip(server):
    c = client(server)
    messages = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]
    r = c.messages.create(model=MODEL_NAME, max_tokens=400, tools=[WEATHER], messages=messages,
                          tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
                          extra_body=GREEDY)
    assert r.stop_reason == "tool_use"
    uses = [b for b in r.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and uses[0].id
    jsonschema.validate(uses[0].input, WEATHER["input_schema"])
    # the tool's answer comes back as a tool_result block; the model goes on from there
    messages += [{"role": "assistant", "content": r.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny"},
                                              {"type": "text", "text": "Thanks!"}]}]
    r2 = c.messages.create(model=MODEL_NAME, max_tokens=8, tools=[WEATHER], messages=messages, extra_body=GREEDY)
    assert r2.stop_reason in ("end_turn", "max_tokens", "tool_use") and r2.usage.input_tokens > r.usage.input_tokens
    # "any", streamed and sampled: one call (no parallel use), as a tool_use block and its input_json_delta
    with c.messages.stream(model=MODEL_NAME, max_tokens=400, tools=[WEATHER],
                           tool_choice={"type": "any", "disable_parallel_tool_use": True},
                           messages=messages[:1], extra_body={"temperature": 0.7, **NO_THINK}) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_start" in kinds
    uses = [b for b in final.content if b.type == "tool_use"]
    assert len(uses) == 1 and final.stop_reason == "tool_use"
    jsonschema.validate(uses[0].input, WEATHER["input_schema"])


def test_errors_come_in_anthropics_shape(server):
    with pytest.raises(anthropic.AuthenticationError):
        client(server, "wrong").messages.create(model=MODEL_NAME, max_tokens=4,
                                                messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.NotFoundError):
        client(server).messages.create(model="claude-opus", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError, match="tool_choice"):
        client(server).messages.create(model=MODEL_NAME, max_tokens=4, messages=[{"role": "user", "content": "hi"}],
                                       tool_choice={"type": "tool", "name": "get_weather"})
    status, body = post_raw(server.url + "/v1/messages", b'{"model": "tiny-moe", "messages": []}',
                            {"x-api-key": "sekrit"})
    assert status == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    status, body = post_raw(server.url + "/v1/messages", b'{"model": "tiny-moe", "max_tokens": 4, "messages": '
                            b'[{"role": "user", "content": [{"type": "image", "source": {}}]}]}', {"x-api-key": "sekrit"})
    assert status == 400 and "'image' block is not supported" in body["error"]["message"]


def test_reasoning_comes_back_as_thinking_blocks(server):
    """Qwen3.5's template thinks unless told not to: what the model writes inside <think> is a thinking block."""
    c = client(server)
    ask = dict(model=MODEL_NAME, max_tokens=12, messages=[{"role": "user", "content": "Why is the sky blue?"}],
               extra_body={"temperature": 0, "thinking": {"type": "enabled", "budget_tokens": 1024}})
    r = c.messages.create(**ask)
    assert r.content[0].type == "thinking" and r.content[0].thinking
    with c.messages.stream(**ask) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert "thinking_delta" in deltas and final.content[0].thinking == r.content[0].thinking

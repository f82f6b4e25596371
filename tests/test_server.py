"""The OpenAI-compatible server, started for real on loopback and driven with the official openai client."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import torch

import flashmoe
from conftest import strict_json
from server_harness import MODEL_NAME, NO_THINKING, RunningServer, get, metric, post_raw, wait_until

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                  "required": ["city", "days"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                      "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "set_alarm", "description": "Set an alarm", "parameters": {
        "type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
        "required": ["hour"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def server(built):
    s = RunningServer(built.store("qwen3_5_moe", 4), cache_gb=0.01, max_active=2, batch_steps=True)
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(built):
    """A second copy of the model for expected outputs (the server's copy belongs to its worker thread)."""
    model = flashmoe.load(built.store("qwen3_5_moe", 4), cache_gb=0.01)
    yield model
    model.close()


def greedy_text(model, messages, max_tokens: int, **template_kwargs) -> str:
    ids = model.encode_chat(messages, **template_kwargs)
    tokens = [t for t in model.generate(ids, max_tokens) if t not in model.eos_token_ids]
    return model.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_models_endpoint(server):
    client = server.client()
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_plain_and_streamed_match_the_model(server, reference):
    client = server.client()
    messages = [{"role": "user", "content": "Hello world! What is the capital of France?"}]
    expected = greedy_text(reference, messages, 12, enable_thinking=False)
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0,
                                       extra_body=NO_THINKING)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(reference.encode_chat(messages, enable_thinking=False))
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=NO_THINKING))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_thinking_goes_to_reasoning_content(server):
    r = server.client().chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=6, temperature=0)
    message = r.choices[0].message
    # the template opened <think>: everything up to </think> is reasoning (the random model never closes it)
    assert message.model_extra.get("reasoning_content") and not message.content


def test_length_seed_and_stop(server):
    client = server.client()
    ask = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Write a haiku about the sea."}],
               extra_body=NO_THINKING)
    r = client.chat.completions.create(max_tokens=5, temperature=0, **ask)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5

    sampled = [client.chat.completions.create(max_tokens=10, temperature=1.0, top_p=0.9, seed=7, **ask)
               .choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]

    full = client.chat.completions.create(max_tokens=24, temperature=0, **ask).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    r = client.chat.completions.create(max_tokens=24, temperature=0, stop=[stop], **ask)
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].message.content
    assert full.startswith(r.choices[0].message.content)


def test_completions_endpoint(server, reference):
    client = server.client()
    ids = reference.tokenizer("The quick brown fox")["input_ids"]
    expected = reference.tokenizer.decode([t for t in reference.generate(ids, 8, stop_token_ids=[])],
                                          skip_special_tokens=True)
    r = client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=8, temperature=0)
    assert r.choices[0].text == expected or r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_NAME, prompt=ids, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text and r.usage.prompt_tokens == len(ids)


def validate_calls(calls, names):
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.function.name in names and call.id
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def tool_store(built, arch: str, bits: int, tmp_path):
    """The tiny store of `arch`; DeepSeek-V3's with a context long enough for the tools' listing (its default tiny
    config has 128 positions, for YaRN's sake)."""
    if arch != "deepseek_v3":
        return built.store(arch, bits)
    from flashmoe.convert import convert

    return convert(built.checkpoint(arch, max_position_embeddings=4096), tmp_path / f"ds-{bits}", bits=bits)


# the XML, JSON, GLM, DeepSeek-V3.1, MiniMax-M2, Kimi-K2 and Mistral tool-call formats (Kimi's and Mistral's markers
# special tokens)
@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next", "glm4_moe", "deepseek_v3", "minimax_m2", "kimi_k2",
                                  "mixtral"])
def test_tool_call_round_trip_forced_by_tool_choice(built, arch, tmp_path):
    s = RunningServer(tool_store(built, arch, 4, tmp_path), cache_gb=0.01)
    try:
        client = s.client()
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        named = {"type": "function", "function": {"name": "get_weather"}}
        r = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, tool_choice=named,
                                           max_tokens=400, temperature=0, parallel_tool_calls=False,
                                           extra_body=NO_THINKING)
        assert r.choices[0].finish_reason == "tool_calls"
        calls = r.choices[0].message.tool_calls
        validate_calls(calls, {"get_weather"})
        assert len(calls) == 1

        # the result goes back, rendered by the template, and the model answers
        messages += [r.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": calls[0].id, "content": '{"forecast": "sunny"}'}]
        r2 = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, max_tokens=8,
                                            temperature=0, extra_body=NO_THINKING)
        assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
        assert r2.usage.prompt_tokens > r.usage.prompt_tokens + 10  # the call and its result are in the prompt
        # tool_choice "none": the model is not told about the tools at all
        r3 = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, tool_choice="none",
                                            max_tokens=2, temperature=0, extra_body=NO_THINKING)
        assert r3.usage.prompt_tokens < r2.usage.prompt_tokens and not r3.choices[0].message.tool_calls

        # "required", streamed: the calls arrive as tool_calls deltas
        chunks = list(client.chat.completions.create(
            model=MODEL_NAME, messages=messages[:1], tools=TOOLS, tool_choice="required", max_tokens=400,
            temperature=0.7, seed=3, parallel_tool_calls=False, stream=True, extra_body=NO_THINKING))
        deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert [d.index for d in deltas] == list(range(len(deltas)))
        validate_calls([d for d in deltas], {"get_weather", "set_alarm"})
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    finally:
        s.close()


# every kind of value the XML format writes: raw strings (an enum with a type, one without, a bounded string) and
# JSON (an integer with bounds, a number, a boolean, an object, an array)
XML_TOOLS = [
    {"type": "function", "function": {"name": "report", "description": "File a weather report", "parameters": {
        "type": "object", "properties": {
            "unit": {"type": "string", "enum": ["C", "F"]}, "city": {"enum": ["Paris", "Rome"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7}, "note": {"type": "string", "maxLength": 8}},
        "required": ["unit", "city", "days", "note"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "measure", "description": "Log a measurement", "parameters": {
        "type": "object", "properties": {
            "temp": {"type": "number"}, "sunny": {"type": "boolean"},
            "wind": {"type": "object", "properties": {"dir": {"enum": ["N", "S"]}}, "required": ["dir"],
                     "additionalProperties": False},
            "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "maxItems": 2}},
        "required": ["temp", "sunny", "wind", "hours"], "additionalProperties": False}}},
]


@pytest.mark.parametrize("arch,bits", [("qwen3_5_moe", 4), ("qwen3_5_moe", 2), ("glm4_moe", 4), ("deepseek_v3", 4),
                                       ("minimax_m2", 4), ("kimi_k2", 4), ("mixtral", 4)])
def test_xml_tool_calls_match_their_schema_and_end_the_turn(built, arch, bits, tmp_path):
    """Qwen3.5's XML calls and GLM-4.5's (raw strings too) sampled at temperature 1, forced by "required" (parallel
    calls allowed) or by name: every argument is exactly what its schema types it as, and the turn ends with them."""
    s = RunningServer(tool_store(built, arch, bits, tmp_path), cache_gb=0.01)
    try:
        client = s.client()
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in XML_TOOLS}
        for seed, choice in enumerate(["required", {"type": "function", "function": {"name": "measure"}}]):
            r = client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": f"Report {seed} on the weather"}],
                tools=XML_TOOLS, tool_choice=choice, max_tokens=600, temperature=1.0, seed=seed, extra_body=NO_THINKING)
            assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content
            for call in r.choices[0].message.tool_calls:
                jsonschema.validate(strict_json(call.function.arguments), schemas[call.function.name])
    finally:
        s.close()


@pytest.mark.parametrize("bits", [4, 2])
def test_json_schema_output_always_validates(built, bits):
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "sunny": {"type": "boolean"},
                                               "rank": {"type": "integer", "minimum": 1, "maximum": 99}},
              "required": ["city", "sunny", "rank"], "additionalProperties": False}
    s = RunningServer(built.store("qwen3_5_moe", bits), cache_gb=0.01)
    try:
        client = s.client()
        for seed in range(3):
            r = client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": f"Weather report {seed} as JSON"}],
                response_format={"type": "json_schema", "json_schema": {"name": "report", "schema": schema}},
                max_tokens=400, temperature=1.0, seed=seed, extra_body=NO_THINKING)
            assert r.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Any JSON"}],
                                           response_format={"type": "json_object"}, max_tokens=400, temperature=0,
                                           extra_body=NO_THINKING)
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    finally:
        s.close()


def test_json_schema_after_a_think_block_the_prompt_opened(server):
    """With thinking on, the grammar lets the reasoning finish first; the answer after it is the JSON."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = server.client().chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "JSON please"}], max_tokens=3, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert r.choices[0].finish_reason == "length"  # the random model keeps thinking; reasoning is not cut by JSON
    assert r.choices[0].message.model_extra.get("reasoning_content") is not None


@pytest.mark.parametrize("body,status,param,text", [
    ({"model": MODEL_NAME, "messages": "hi"}, 400, "messages", "valid list"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
     "temperature", "valid number"),
    ({"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", "Input should be"),
    ({"model": MODEL_NAME, "messages": []}, 400, "messages", "at least 1"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "does not exist"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens",
     "greater than or equal to 1"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "messages",
     "context is 4096 tokens"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello " * 5000}]}, 400, "messages",
     "context is 4096 tokens"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", "only n=1"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, 400,
     "tool_choice", "needs tools"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
      "tool_choice": {"type": "function", "function": {"name": "launch_rocket"}}}, 400, "tool_choice", "launch_rocket"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                       "minProperties": "two"}}}},
     400, None, "invalid response_format schema"),
])
def test_bad_requests_get_openai_error_bodies(server, body, status, param, text):
    code, reply = post_raw(server.url + "/v1/chat/completions", json.dumps(body).encode())
    assert code == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert text in error["message"] and error["param"] == param
    if "context is" in text:
        assert error["code"] == "context_length_exceeded"


def test_malformed_json_and_unknown_routes(server):
    code, reply = post_raw(server.url + "/v1/chat/completions", b'{"model": "tiny-moe", "messages": [')
    assert code == 400 and "not valid JSON" in reply["error"]["message"]
    code, reply = post_raw(server.url + "/v1/nothing", b"{}")
    assert code == 404 and reply["error"]["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model=MODEL_NAME, prompt=[999999], max_tokens=2)
    assert "token ids" in str(info.value)
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model=MODEL_NAME, prompt=[5] * 4000, max_tokens=200)
    assert info.value.body["code"] == "context_length_exceeded" and info.value.body["param"] == "prompt"
    # the server keeps serving after all of that
    r = server.client().chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=2, extra_body=NO_THINKING)
    assert r.usage.completion_tokens >= 1


OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is "
       "free. Including non-PyTorch memory, this process has 78.1 GiB memory in use. Of the allocated memory ...")


@pytest.mark.parametrize("error,said", [
    (flashmoe.FlashMoeError("corrupt store: layer 1 expert 3 fails its checksum"), "corrupt store"),
    (torch.cuda.OutOfMemoryError(OOM), "the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB"),
])
def test_a_failure_inside_generation_fails_that_request_only(server, monkeypatch, error, said):
    failed = metric(server, 'flashmoe_requests_total{outcome="failed"}')
    real_step = server.model.step

    def broken_step(sequences):  # the worker's forward fails once a request has two tokens
        if any(seq.generated == 2 for seq in sequences):
            raise error
        return real_step(sequences)

    monkeypatch.setattr(server.model, "step", broken_step)
    client = server.client()
    ask = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=8, extra_body=NO_THINKING)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(**ask)
    assert said in info.value.body["message"] and info.value.body["type"] == "server_error"
    assert "\n" not in info.value.body["message"]
    with pytest.raises(openai.APIError, match=re.escape(said)):  # streamed: an error event ends the stream
        list(client.chat.completions.create(stream=True, **ask))
    monkeypatch.undo()
    assert client.chat.completions.create(**ask).usage.completion_tokens >= 1
    assert metric(server, 'flashmoe_requests_total{outcome="failed"}') == failed + 2


def test_api_key(built):
    s = RunningServer(built.store("qwen3_5_moe", 4), api_key="sesame", cache_gb=0.01)
    try:
        with pytest.raises(openai.AuthenticationError) as info:
            s.client("wrong").models.list()
        assert info.value.body["code"] == "invalid_api_key"
        assert [m.id for m in s.client("sesame").models.list()] == [MODEL_NAME]
        assert get(s.url + "/health")[0] == 200  # health and metrics stay open for probes
    finally:
        s.close()


def test_concurrent_clients_get_what_they_would_get_alone(server, reference):
    prompts = [f"Tell me about {topic}." for topic in ("the sea", "foxes", "Paris", "experts", "memory")]
    expected = [greedy_text(reference, [{"role": "user", "content": p}], 10, enable_thinking=False) for p in prompts]
    finished_before = metric(server, 'flashmoe_requests_total{outcome="finished"}')

    def ask(prompt):
        return server.client().chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=10, temperature=0,
            extra_body=NO_THINKING).choices[0].message.content

    with ThreadPoolExecutor(len(prompts)) as pool:  # more clients than max_active=2: some queue
        answers = list(pool.map(ask, prompts))
    assert answers == expected
    assert metric(server, 'flashmoe_requests_total{outcome="finished"}') == finished_before + len(prompts)


def test_a_step_each_also_gives_concurrent_clients_what_they_would_get_alone(built, reference):
    """serve's way on a GPU (--no-batch-steps): the running requests take a forward each in turn."""
    s = RunningServer(built.store("qwen3_5_moe", 4), cache_gb=0.01, max_active=2, batch_steps=False)
    try:
        prompts = [f"Tell me about {topic}." for topic in ("rivers", "owls", "Rome")]
        expected = [greedy_text(reference, [{"role": "user", "content": p}], 8, enable_thinking=False) for p in prompts]

        def ask(prompt):
            return s.client().chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0,
                extra_body=NO_THINKING).choices[0].message.content

        with ThreadPoolExecutor(len(prompts)) as pool:
            assert list(pool.map(ask, prompts)) == expected
        assert not s.served.scheduler.batch_steps
    finally:
        s.close()


def test_disconnect_cancels_and_health_answers_during_generation(server):
    cancelled = metric(server, 'flashmoe_requests_total{outcome="cancelled"}')
    generated = metric(server, "flashmoe_generated_tokens_total")
    client = server.client()
    stream = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Go on forever"}],
                                            max_tokens=3000, temperature=0.8, seed=1, stream=True)
    received = 0
    for _ in stream:
        received += 1
        if received == 3:
            code, body = get(server.url + "/health")  # answered while the generation runs
            assert code == 200 and json.loads(body)["active"] == 1
            break
    stream.close()  # the client goes away mid-stream
    wait_until(lambda: metric(server, 'flashmoe_requests_total{outcome="cancelled"}') == cancelled + 1)
    assert metric(server, "flashmoe_active_requests") == 0
    assert metric(server, "flashmoe_generated_tokens_total") - generated < 3000


def test_non_streamed_request_is_cancelled_when_its_client_leaves(server, monkeypatch):
    cancelled = metric(server, 'flashmoe_requests_total{outcome="cancelled"}')
    # no stop token: a sampled reply could end inside the client's second on a fast machine (it did, in CI)
    monkeypatch.setattr(type(server.model), "eos_token_ids", property(lambda model: []))
    client = server.client(timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Go on"}],
                                       max_tokens=3000, temperature=0.8, seed=2)
    wait_until(lambda: metric(server, 'flashmoe_requests_total{outcome="cancelled"}') == cancelled + 1)


def test_a_full_queue_answers_503_and_loses_nothing(built):
    s = RunningServer(built.store("qwen3_5_moe", 4), cache_gb=0.01, max_active=1, max_waiting=1)
    try:
        client = s.client()
        long_stream = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "a"}],
                                                     max_tokens=3000, stream=True)
        next(iter(long_stream))  # running
        results = {}
        queued = threading.Thread(target=lambda: results.update(r=client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "b"}], max_tokens=4, extra_body=NO_THINKING)))
        queued.start()
        wait_until(lambda: metric(s, "flashmoe_queue_depth") == 1)
        with pytest.raises(openai.InternalServerError) as info:  # 503: one running, one waiting, no room
            client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "c"}], max_tokens=4)
        assert info.value.status_code == 503 and info.value.body["code"] == "server_busy"
        long_stream.close()
        queued.join(timeout=120)
        assert results["r"].usage.completion_tokens >= 1  # the queued request was served
    finally:
        s.close()


def test_metrics_exposition(server):
    code, text = get(server.url + "/metrics")
    assert code == 200
    for name in ("flashmoe_queue_depth", "flashmoe_active_requests", "flashmoe_generation_tokens_per_second",
                 "flashmoe_generated_tokens_total", "flashmoe_prompt_tokens_total",
                 'flashmoe_expert_cache_hit_rate{tier="ram"}', "flashmoe_expert_bytes_read_total"):
        assert name in text
    assert metric(server, "flashmoe_generated_tokens_total") > 0


@pytest.mark.gpu
def test_gpu_server_interleaves_sequences_without_mixing_them(built):
    """On CUDA each sequence has its own decode graphs; interleaving them token by token must not change any
    answer, and grammars work on logits that come from the GPU."""
    s = RunningServer(built.store("qwen3_5_moe", 4), device="cuda", max_active=3)
    try:
        client = s.client()
        prompts = [f"Story number {i} about the sea." for i in range(5)]

        def ask(prompt):
            return client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0,
                extra_body=NO_THINKING).choices[0].message.content

        alone = [ask(p) for p in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(ask, prompts))
        assert together == alone
        r = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "weather"}], tools=TOOLS, tool_choice="required",
            max_tokens=400, temperature=0, parallel_tool_calls=False, extra_body=NO_THINKING)
        validate_calls(r.choices[0].message.tool_calls, set(SCHEMAS))
    finally:
        s.close()

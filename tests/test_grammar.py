"""Grammars driven by random logits over the tiny tokenizer: a model that samples everything the grammar allows,
as a weak or 2-bit one does. Every output that finishes must parse, and its arguments must match the schema."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from conftest import strict_json
from flashmoe.chat import OutputParser
from flashmoe.errors import FlashMoeError
from flashmoe.grammar import GRAMMAR_CACHE_BYTES, Grammars
from flashmoe.sampling import sample

SEEDS = range(20)
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {
            "unit": {"type": "string", "enum": ["C", "F"]}, "city": {"enum": ["Paris", "Rome"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7}, "note": {"type": "string"}},
        "required": ["unit", "city", "days", "note"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "log_reading", "parameters": {
        "type": "object", "properties": {
            "value": {"type": "number"}, "exact": {"type": "boolean"},
            "where": {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                                       "site": {"type": "string"}},
                      "required": ["lat", "site"], "additionalProperties": False},
            "ids": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
            "label": {"type": "string", "minLength": 2, "maxLength": 6},
            "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"}},
        "required": ["value", "exact", "where", "ids", "label"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
# what a model writes now and then to end a free-text value; a random one rarely spells a closing tag itself
CLOSERS = ["\n</parameter>\n", '"', "<tool_call>"]


@pytest.fixture(scope="module")
def tokenizer(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built.checkpoint("qwen3_5_moe"))


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return Grammars(tokenizer, 512, [tokenizer.eos_token_id])


def random_output(constraint, tokenizer, seed: int, stop_bias: float = 4.0, max_tokens: int = 300):
    """(text, finished): tokens sampled at temperature 1 from random logits under the grammar."""
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    eos, ids, plan = tokenizer.eos_token_id, [], []
    for _ in range(max_tokens):
        logits = torch.randn(512, generator=gen)
        logits[eos] += stop_bias
        constraint.mask(logits)
        if not plan and rng.random() < 0.3:
            plan = tokenizer.encode(rng.choice(CLOSERS))
        if plan and torch.isfinite(logits[plan[0]]):
            token = plan.pop(0)
        else:
            plan, token = [], sample(logits, 1.0, generator=gen)
        constraint.accept(token)
        if token == eos:
            return tokenizer.decode(ids), True
        ids.append(token)
    return tokenizer.decode(ids), False


def parse(text: str, tool_format: str, tools: list[dict] = TOOLS):
    parser = OutputParser(tool_format, tools)
    a, b = parser.feed(text), parser.close()
    return a.content + b.content, a.tool_calls + b.tool_calls


def accepts(constraint, tokenizer, text: str) -> bool:
    try:
        for token in tokenizer.encode(text):
            constraint.accept(token)
    except FlashMoeError:  # a token the grammar masks
        return False
    return True


@pytest.mark.parametrize("tool_format", ["xml", "json"])
@pytest.mark.parametrize("choice", ["required", "named", "auto"])
def test_tool_call_arguments_always_match_their_schema(grammars, tokenizer, tool_format, choice):
    tool_choice = {"type": "function", "function": {"name": "log_reading"}} if choice == "named" else choice
    finished = 0
    for seed in SEEDS:
        constraint = grammars.tool_calls(tool_format, TOOLS, tool_choice, "disabled", parallel_tool_calls=True)
        text, done = random_output(constraint, tokenizer, seed)
        if not done:
            continue  # cut by max_tokens: the one case of an incomplete call
        finished += 1
        content, calls = parse(text, tool_format)
        for call in calls:
            jsonschema.validate(strict_json(call.arguments), SCHEMAS[call.name])
        if choice != "auto":  # forced calls, then the end of the turn: no text before or after them
            assert calls and content == "", text
            assert choice == "required" or [c.name for c in calls] == ["log_reading"]
    assert finished >= len(SEEDS) // 4  # enough finished outputs for the test to see something


@pytest.mark.parametrize("choice", ["required", "named", "auto"])
def test_deepseek_r1_fenced_calls_always_match_their_schema(built, choice):
    """DeepSeek-V3/R1's fenced calls under random logits, with a DeepSeek tokenizer (its markers one token each)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built.checkpoint("deepseek_v3"))
    grammars = Grammars(tokenizer, 512, [tokenizer.eos_token_id])
    tool_choice = {"type": "function", "function": {"name": "log_reading"}} if choice == "named" else choice
    finished = with_calls = 0
    for seed in SEEDS:
        constraint = grammars.tool_calls("deepseek_fenced", TOOLS, tool_choice, "disabled", parallel_tool_calls=True)
        text, done = random_output(constraint, tokenizer, seed, max_tokens=600)  # this tokenizer's pieces are short
        if not done:
            continue
        finished += 1
        content, calls = parse(text, "deepseek_fenced")
        with_calls += bool(calls)
        for call in calls:
            jsonschema.validate(strict_json(call.arguments), SCHEMAS[call.name])
        if choice != "auto":
            assert calls and content == "", text
            assert choice == "required" or [c.name for c in calls] == ["log_reading"]
    assert finished >= len(SEEDS) // 4 and (choice == "auto" or with_calls == finished)


def test_string_values_are_raw_and_other_values_exact(grammars, tokenizer):
    """No whitespace around an enum member or a number; a string's own whitespace is kept."""
    head = "<tool_call>\n<function=get_weather>\n<parameter=unit>\n"
    days = head + "C\n</parameter>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n"
    for start, value, ok in [(head, "C", True), (head, " C", False), (head, "\nC", False), (head, "C\t", False),
                             (days, "7", True), (days, " 7", False), (days, "7\r", False)]:
        constraint = grammars.tool_calls("xml", TOOLS, "required", "disabled", parallel_tool_calls=False)
        assert accepts(constraint, tokenizer, start + value + "\n</parameter>\n") == ok, repr(value)
    text = (head + "F\n</parameter>\n<parameter=city>\nRome\n</parameter>\n<parameter=days>\n7\n</parameter>\n"
            "<parameter=note>\n two\nlines \n</parameter>\n</function>\n</tool_call>")
    constraint = grammars.tool_calls("xml", TOOLS, "required", "disabled", parallel_tool_calls=False)
    assert accepts(constraint, tokenizer, text + tokenizer.eos_token)
    assert json.loads(parse(text, "xml")[1][0].arguments) == {"unit": "F", "city": "Rome", "days": 7,
                                                              "note": " two\nlines "}


@pytest.mark.parametrize("tool_format", ["xml", "json"])
def test_required_calls_end_the_turn(grammars, tokenizer, tool_format):
    """After the calls only another call (a newline apart, as the templates write them) or the end of turn."""
    pick = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"unit": {"enum": ["C", "F"]}}, "required": ["unit"]}}}
    with_calls = []
    for seed in SEEDS:
        constraint = grammars.tool_calls(tool_format, [pick], "required", "disabled", parallel_tool_calls=True)
        text, done = random_output(constraint, tokenizer, seed, stop_bias=0.0)
        content, calls = parse(text, tool_format, [pick])
        if done:
            assert content == "" and calls and text.endswith("</tool_call>"), text
            assert all(json.loads(c.arguments)["unit"] in ("C", "F") for c in calls)
            assert text.count("</tool_call>\n<tool_call>") == len(calls) - 1
            with_calls.append(len(calls))
    assert max(with_calls) >= 2  # parallel calls happen, and they too end the turn


JSON_STRINGS = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    "code": {"type": "string", "pattern": "^[^0-9]{1,4}$"},
    "when": {"type": "string", "format": "date-time"},
    "mark": {"enum": ["a\tb", "c\u0001", 7]}, "line": {"type": "string", "const": "x\ny"}},
    "required": ["name", "tags", "code", "when", "mark", "line"], "additionalProperties": False}


def test_json_schema_strings_always_parse(grammars, tokenizer):
    """Strings with length bounds, a pattern, a format, an enum or a const never hold raw control characters."""
    finished = 0
    for seed in SEEDS:
        text, done = random_output(grammars.json(JSON_STRINGS, "disabled"), tokenizer, seed)
        if done:
            jsonschema.validate(strict_json(text), JSON_STRINGS)
            finished += 1
    assert finished >= len(SEEDS) // 2


def test_compiled_grammars_stay_within_the_cache_limit(tokenizer):
    limit = 256 << 10
    grammars = Grammars(tokenizer, 512, [tokenizer.eos_token_id], cache_limit_bytes=limit)
    sizes = []
    for i in range(24):  # distinct schemas: none is a cache hit
        grammars.json({"type": "object", "properties": {f"field_{i}": {"type": "integer"}}}, "disabled")
        sizes.append(grammars.cache_bytes)
        assert 0 < grammars.cache_bytes <= limit
    assert sizes[0] * len(sizes) > 2 * limit  # unbounded, the cache would have held twice the limit
    assert Grammars(tokenizer, 512, [tokenizer.eos_token_id])._compiler.cache_limit_bytes == GRAMMAR_CACHE_BYTES

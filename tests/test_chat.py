"""Chat templates, output parsing and text streaming, without a server."""

from __future__ import annotations

import json

import pytest

from flashmoe.chat import ChatFormat, OutputParser, detect_tool_format
from flashmoe.errors import FlashMoeError
from flashmoe.textstream import IncrementalDecoder, StopStrings
from flashmoe.tiny import build_tokenizer
from flashmoe.tiny_templates import GLM4_CHAT_TEMPLATE, QWEN3_5_CHAT_TEMPLATE, QWEN3_CHAT_TEMPLATE

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "hourly": {"type": "boolean"}}}}}

XML_OUTPUT = ("I should look it up.</think>\n\nLet me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\n"
              "New York\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=hourly>\ntrue\n</parameter>\n"
              "</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\n42\n</parameter>\n"
              "</function>\n</tool_call>")
JSON_OUTPUT = ('<think>\nweather needs a tool\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
               '{"city": "Paris", "days": 2}}\n</tool_call>')


def parse_in_pieces(parser: OutputParser, text: str, size: int):
    reasoning, content, calls = "", "", []
    for i in range(0, len(text), size):
        d = parser.feed(text[i:i + size])
        reasoning, content, calls = reasoning + d.reasoning, content + d.content, calls + d.tool_calls
    d = parser.close()
    return reasoning + d.reasoning, content + d.content, calls + d.tool_calls


@pytest.mark.parametrize("size", [1, 2, 5, 7, 1000])
def test_xml_tool_calls_parse_the_same_however_the_text_is_split(size):
    reasoning, content, calls = parse_in_pieces(OutputParser("xml", [WEATHER], prompt_opened_think=True), XML_OUTPUT, size)
    assert reasoning == "I should look it up."
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_weather"]
    assert json.loads(calls[0].arguments) == {"city": "New York", "days": 3, "hourly": True}
    assert json.loads(calls[1].arguments) == {"city": "42"}  # a string parameter stays a string
    assert calls[0].id != calls[1].id


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_json_tool_calls_and_a_think_block_the_model_opened(size):
    reasoning, content, calls = parse_in_pieces(OutputParser("json", [WEATHER]), JSON_OUTPUT, size)
    assert reasoning.strip() == "weather needs a tool" and content == ""
    assert json.loads(calls[0].arguments) == {"city": "Paris", "days": 2}


def test_xml_values_are_raw_strings_or_json_as_written():
    """The parser reads a value as the grammar writes it (structural_tags.py): a string raw, with its own
    whitespace; anything else as JSON, kept as written (1e999 stays a number, not Infinity)."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "$defs": {"Unit": {"enum": ["C", "F"]}}, "properties": {
            "unit": {"$ref": "#/$defs/Unit"}, "text": {"type": "string"}, "day": {"type": "string", "format": "date"},
            "temp": {"type": "number"}, "tags": {"type": "array"}, "id": {"enum": [1, "2"]}}}}}
    output = ("<tool_call>\n<function=f>\n<parameter=unit>\nC\n</parameter>\n<parameter=text>\n two\nlines\n\n"
              '</parameter>\n<parameter=day>\n"2024-01-02"\n</parameter>\n<parameter=temp>\n1e999\n</parameter>\n'
              '<parameter=tags>\n["a", 1]\n</parameter>\n<parameter=id>\n"2"\n</parameter>\n</function>\n</tool_call>')
    _, _, calls = parse_in_pieces(OutputParser("xml", [tool]), output, 1000)
    assert calls[0].arguments == ('{"unit": "C", "text": " two\\nlines\\n", "day": "2024-01-02", "temp": 1e999, '
                                  '"tags": ["a", 1], "id": "2"}')
    _, _, calls = parse_in_pieces(OutputParser("json", [tool]), '<tool_call>\n{"name": "f", "arguments": '
                                  '{"temp": -2E+999}}\n</tool_call>', 1000)
    assert calls[0].arguments == '{"temp": -2E+999}'


GLM_OUTPUT = ("Let me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>New York</arg_value>\n"
              "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>hourly</arg_key>\n<arg_value>true</arg_value>\n"
              "</tool_call>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value> 42\n</arg_value>\n</tool_call>")


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_glm_tool_calls_parse_the_same_however_the_text_is_split(size):
    """GLM-4.5's format: the name after <tool_call>, each argument as <arg_key>/<arg_value>; a string value raw
    (its own whitespace kept), others as JSON."""
    _, content, calls = parse_in_pieces(OutputParser("glm", [WEATHER]), GLM_OUTPUT, size)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_weather"]
    assert json.loads(calls[0].arguments) == {"city": "New York", "days": 3, "hourly": True}
    assert json.loads(calls[1].arguments) == {"city": " 42\n"}
    _, content, calls = parse_in_pieces(OutputParser("glm"), "<tool_call>\n</tool_call>", 3)
    assert calls == [] and "<tool_call>" in content  # no name: kept as text


DEEPSEEK_OUTPUT = ("Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
                   '{"city": "New York", "days": 3}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>'
                   '{"city": "Oslo"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>')


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_deepseek_tool_calls_parse_the_same_however_the_text_is_split(size):
    """DeepSeek-V3.1's format: a section of calls, each NAME<｜tool▁sep｜>JSON; the section's markers are not text."""
    _, content, calls = parse_in_pieces(OutputParser("deepseek", [WEATHER]), DEEPSEEK_OUTPUT, size)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "New York", "days": 3}), ("get_weather", {"city": "Oslo"})]
    _, content, calls = parse_in_pieces(OutputParser("deepseek"), "<｜tool▁call▁begin｜>f<｜tool▁sep｜>[1]<｜tool▁call▁end｜>", 3)
    assert calls == [] and "[1]" in content  # arguments that are not an object: kept as text


MINIMAX_OUTPUT = ('Let me check.\n<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">New York'
                  '</parameter>\n<parameter name="days">3</parameter>\n</invoke>\n<invoke name="get_weather">\n'
                  '<parameter name="city"> 42\n</parameter>\n</invoke>\n</minimax:tool_call>')


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_minimax_tool_calls_parse_the_same_however_the_text_is_split(size):
    """MiniMax-M2's format: invoke blocks inside <minimax:tool_call>; a string value raw (its own whitespace kept),
    others as JSON."""
    _, content, calls = parse_in_pieces(OutputParser("minimax", [WEATHER]), MINIMAX_OUTPUT, size)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "New York", "days": 3}), ("get_weather", {"city": " 42\n"})]
    from flashmoe.tiny_templates import MINIMAX_M2_CHAT_TEMPLATE

    assert detect_tool_format(MINIMAX_M2_CHAT_TEMPLATE) == "minimax"


KIMI_OUTPUT = ("Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
               '<|tool_call_argument_begin|>{"city": "New York", "days": 3}<|tool_call_end|><|tool_call_begin|>'
               'functions.get_weather:1<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|>'
               "<|tool_calls_section_end|>")


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_kimi_tool_calls_parse_with_the_ids_its_template_refers_to(size):
    """Kimi-K2's format: functions.NAME:INDEX ids, the arguments after <|tool_call_argument_begin|>."""
    from flashmoe.tiny_templates import KIMI_K2_CHAT_TEMPLATE

    _, content, calls = parse_in_pieces(OutputParser("kimi", [WEATHER]), KIMI_OUTPUT, size)
    assert content == "Let me check."
    assert [(c.id, c.name, json.loads(c.arguments)) for c in calls] == [
        ("functions.get_weather:0", "get_weather", {"city": "New York", "days": 3}),
        ("functions.get_weather:1", "get_weather", {"city": "Oslo"})]
    assert detect_tool_format(KIMI_K2_CHAT_TEMPLATE) == "kimi"


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_mistral_tool_calls_run_to_the_end_of_the_text(size):
    """Mistral's format: [TOOL_CALLS] and one JSON list; its calls come when the text ends, with 9-character ids."""
    from flashmoe.tiny_templates import MIXTRAL_CHAT_TEMPLATE

    text = ('Let me check.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"}, '
            '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}]')
    _, content, calls = parse_in_pieces(OutputParser("mistral", [WEATHER]), text, size)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("get_weather", {"city": "Oslo", "days": 2})]
    assert calls[0].id == "abc123def" and len(calls[1].id) == 9
    _, content, calls = parse_in_pieces(OutputParser("mistral"), "[TOOL_CALLS] [{not json", 3)
    assert calls == [] and content == "[TOOL_CALLS] [{not json"
    assert detect_tool_format(MIXTRAL_CHAT_TEMPLATE) == "mistral"


def test_deepseek_v3_1_templates_are_told_from_the_older_fenced_calls():
    from flashmoe.tiny_templates import DEEPSEEK_V3_CHAT_TEMPLATE

    assert detect_tool_format(DEEPSEEK_V3_CHAT_TEMPLATE) == "deepseek"
    # DeepSeek-V3/R1's calls: function<｜tool▁sep｜>NAME and a ```json block, read where the template lists the tools
    older = "{% if tools %}<｜tool▁call▁begin｜>function<｜tool▁sep｜>{{ name }}\n```json\n{{ args }}\n```{% endif %}"
    assert detect_tool_format(older) == "deepseek_fenced"
    # R1's own template writes past calls but never lists tools: it takes none
    assert detect_tool_format(older.replace("{% if tools %}", "{% if message.tool_calls %}")) is None


DEEPSEEK_FENCED_OUTPUT = ("Checking both.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
                          '```json\n{"city": "New York", "days": 3}\n```<｜tool▁call▁end｜>\n'
                          "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                          '{"city": "Oslo"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_deepseek_r1_fenced_tool_calls_parse_the_same_however_the_text_is_split(size):
    """DeepSeek-V3's and R1's format: a section of calls, each function<｜tool▁sep｜>NAME and its arguments in a
    ```json fence, a newline apart."""
    _, content, calls = parse_in_pieces(OutputParser("deepseek_fenced", [WEATHER]), DEEPSEEK_FENCED_OUTPUT, size)
    assert content == "Checking both."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "New York", "days": 3}), ("get_weather", {"city": "Oslo"})]
    for bad in ("function<｜tool▁sep｜>f\n{\"x\": 1}",  # no fence
                "function<｜tool▁sep｜>f\n```json\n[1]\n```",  # not an object
                "other<｜tool▁sep｜>f\n```json\n{}\n```"):  # not a function
        _, content, calls = parse_in_pieces(OutputParser("deepseek_fenced"),
                                            f"<｜tool▁call▁begin｜>{bad}<｜tool▁call▁end｜>", 3)
        assert calls == [] and "<｜tool▁sep｜>f" in content, bad


def test_malformed_or_unfinished_tool_calls_stay_as_text():
    _, content, calls = parse_in_pieces(OutputParser("json"), "<tool_call>\nnot json\n</tool_call> after", 3)
    assert calls == [] and "not json" in content and content.endswith("after")
    _, content, calls = parse_in_pieces(OutputParser("xml"), "Sure <tool_call>\n<function=f>\n<param", 4)
    assert calls == [] and content.startswith("Sure") and "<function=f>" in content


def test_without_a_tool_format_markup_is_plain_content():
    _, content, calls = parse_in_pieces(OutputParser(None, parse_reasoning=False), "<think>x</think> <tool_call>", 2)
    assert content == "<think>x</think> <tool_call>" and calls == []


def test_stop_strings_cut_the_text_even_across_pieces():
    stop = StopStrings(["END", "\n\n"])
    out = "".join(stop.feed(ch) for ch in "one two EN") + stop.feed("D three")
    assert out == "one two " and stop.stopped and stop.close() == ""
    stop = StopStrings(["xyz"])
    assert "".join(stop.feed(ch) for ch in "abcxy") + stop.close() == "abcxy"  # no stop: held text comes back


def test_incremental_decoding_keeps_multibyte_characters_whole():
    tok = build_tokenizer(512)
    text = "héllo wörld 你好 🙂 <tool_call>"
    ids = tok.encode(text)
    dec = IncrementalDecoder(tok)
    pieces = [dec.add(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert IncrementalDecoder(tok, skip_token_ids={eos}).add(eos) == ""


def test_markup_that_a_tokenizer_makes_special_stays_in_the_text_and_other_specials_go():
    """Some releases make their tool-call markers special tokens (decoding would drop them): the format's markers are
    kept, every other special token still goes."""
    from tokenizers import AddedToken

    from flashmoe.chat import format_markers

    tok = build_tokenizer(512)
    tok.add_tokens([AddedToken(m, special=True, normalized=False) for m in ("<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
                                                                           "<｜tool▁call▁end｜>")])
    text = 'a<｜tool▁call▁begin｜>f<｜tool▁sep｜>{"x": 1}<｜tool▁call▁end｜><|im_start|>b'
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == 'af{"x": 1}b'  # what plain decoding would give the parser
    dec = IncrementalDecoder(tok, markers=format_markers("deepseek"))
    assert "".join(dec.add(i) for i in ids) + dec.flush() == 'a<｜tool▁call▁begin｜>f<｜tool▁sep｜>{"x": 1}<｜tool▁call▁end｜>b'
    _, content, calls = parse_in_pieces(OutputParser("deepseek"), 'a<｜tool▁call▁begin｜>f<｜tool▁sep｜>{"x": 1}'
                                        '<｜tool▁call▁end｜>b', 4)
    assert [c.name for c in calls] == ["f"] and content == "ab"


def test_templates_render_tools_history_and_the_thinking_switch():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    xml = ChatFormat(build_tokenizer(512, QWEN3_5_CHAT_TEMPLATE))
    assert xml.tool_format == "xml" and xml.thinks
    text = xml.render(history, [WEATHER])
    assert '"name": "get_weather"' in text and "Weather in Paris?" in text
    assert "<function=get_weather>\n<parameter=city>\nParis\n</parameter>" in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert xml.render(history[:1], enable_thinking=False).endswith("<think>\n\n</think>\n\n")

    js = ChatFormat(build_tokenizer(512, QWEN3_CHAT_TEMPLATE))
    assert js.tool_format == "json"
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in js.render(history, [WEATHER])

    glm = ChatFormat(build_tokenizer(512, GLM4_CHAT_TEMPLATE, "glm"))
    assert glm.tool_format == "glm" and not glm.thinks
    text = glm.render(history, [WEATHER])
    assert "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>" in text
    assert text.endswith("<|observation|>\n<tool_response>\nsunny\n</tool_response><|assistant|>\n")


def test_bad_messages_are_clear_errors():
    fmt = ChatFormat(build_tokenizer(512, QWEN3_5_CHAT_TEMPLATE))
    with pytest.raises(FlashMoeError, match="image_url"):
        fmt.render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(FlashMoeError, match="not valid JSON"):
        fmt.render([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}])
    assert fmt.render([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                      enable_thinking=False).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert detect_tool_format(None) is None and detect_tool_format("{{ messages }}") is None


def test_every_tool_format_module_answers_the_registry():
    """tool_formats/: each module has what the parser, the decoder and the grammar read, under its own name."""
    from flashmoe import tool_formats

    for name, fmt in tool_formats.FORMATS.items():
        assert fmt.NAME == name
        for attribute in ("CALL_BEGIN", "CALL_END", "SECTION", "MARKUP", "detect", "parse", "grammar"):
            assert hasattr(fmt, attribute), (name, attribute)
        markers = tool_formats.markers(name)
        assert all(m in markers for m in (fmt.CALL_BEGIN, fmt.CALL_END, *fmt.SECTION, *fmt.MARKUP) if m)
    assert tool_formats.detect(None) is None and tool_formats.detect("no tools here") is None
    reply = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
    [call] = tool_formats.get("harmony").parse(reply, {})
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')

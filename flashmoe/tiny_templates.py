"""Chat templates for the tiny checkpoints, in the formats the real Qwen checkpoints use (and Mixtral's).

Written for flashmoe's fixtures; what matters is that they render the same text as the real templates do
where the server depends on it: tools listed in the system turn, assistant tool calls and tool results in
history, and the thinking switch. Qwen3 / Qwen3-Next call tools as `<tool_call>{json}</tool_call>`;
Qwen3.5 as `<tool_call><function=NAME><parameter=KEY>VALUE</parameter></function></tool_call>` and opens a
`<think>` block in the generation prompt unless `enable_thinking=False`.
"""

# Shared parts: the system turn with the tool list, user/system turns, tool results grouped into one user turn.
_SYSTEM_AND_TOOLS = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages and messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\n' + TOOL_INSTRUCTIONS + '<|im_end|>\\n' }}
{%- elif messages and messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
"""

_TURNS = """\
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' + (message.content or '') }}
{%- for call in (message.tool_calls or []) %}
{%- set call = call.function if call.function is defined else call %}
{{- '\\n' if (loop.first and message.content) or not loop.first else '' }}
{{- RENDER_CALL(call) }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
"""

QWEN3_CHAT_TEMPLATE = (
    """\
{%- set TOOL_INSTRUCTIONS = 'For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>' %}
{%- macro RENDER_CALL(call) %}
{{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
{{- call.arguments if call.arguments is string else (call.arguments | tojson) }}
{{- '}\\n</tool_call>' }}
{%- endmacro %}
"""
    + _SYSTEM_AND_TOOLS + _TURNS
    + """\
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""
)

QWEN3_5_CHAT_TEMPLATE = (
    """\
{%- set TOOL_INSTRUCTIONS = 'If you choose to call a function, reply in the following format:\\n<tool_call>\\n\
<function=example_function_name>\\n<parameter=example_parameter>\\nvalue\\n</parameter>\\n</function>\\n</tool_call>' %}
{%- macro RENDER_CALL(call) %}
{{- '<tool_call>\\n<function=' + call.name + '>\\n' }}
{%- for key, value in ((call.arguments | items) if call.arguments is mapping else []) %}
{{- '<parameter=' + key + '>\\n' + (value if value is string else (value | tojson)) + '\\n</parameter>\\n' }}
{%- endfor %}
{{- '</function>\\n</tool_call>' }}
{%- endmacro %}
"""
    + _SYSTEM_AND_TOOLS + _TURNS
    + """\
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}
{%- else %}{{- '<think>\\n' }}{%- endif %}
{%- endif %}
"""
)

# Mixtral-8x22B-Instruct-v0.1's format (Mistral's v3 tokenizer, simplified): [INST] user turns, assistant replies
# ended by </s>; the tools as JSON in [AVAILABLE_TOOLS] before the last user turn, calls as [TOOL_CALLS] and a JSON
# list that ends the turn, results in [TOOL_RESULTS] (each call's id 9 letters and digits)
MIXTRAL_CHAT_TEMPLATE = """\
{{ bos_token }}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}{% if message.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for message in messages %}
{%- if message.role == 'user' %}
{%- if tools and loop.index0 == ns.last_user %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}\
[INST] {{ message.content }} [/INST]
{%- elif message.role == 'assistant' and message.tool_calls %}[TOOL_CALLS] [\
{%- for call in message.tool_calls %}{{ {"name": call.function.name, "arguments": call.function.arguments, "id": call.id}\
 | tojson }}{{ ", " if not loop.last }}{% endfor %}]{{ eos_token }}
{%- elif message.role == 'tool' %}[TOOL_RESULTS] {{ {"content": message.content, "call_id": message.tool_call_id} \
| tojson }}[/TOOL_RESULTS]
{%- elif message.role == 'assistant' %}{{ message.content }}{{ eos_token }}
{%- else %}{{ raise_exception('Only user, assistant and tool roles are supported!') }}
{%- endif %}
{%- endfor %}"""

# GLM-4.5's format (its released template, thinking aside): [gMASK]<sop>, then <|role|> and the text; tools listed in
# a system turn, calls as <tool_call>NAME\n<arg_key>KEY</arg_key>\n<arg_value>VALUE</arg_value>\n...</tool_call> (a
# string value raw, others as JSON), results in an <|observation|> turn; a reply ends at <|user|>, <|observation|> or
# <|endoftext|>
GLM4_CHAT_TEMPLATE = """\
[gMASK]<sop>
{%- if tools %}
{{- '<|system|>\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\\n' }}
{%- for tool in tools %}{{- (tool | tojson) + '\\n' }}{%- endfor %}
{{- '</tools>\\n\\nFor each function call, output the function name and arguments within the following XML format:' }}
{{- '\\n<tool_call>{function-name}\\n<arg_key>{arg-key-1}</arg_key>\\n<arg_value>{arg-value-1}</arg_value>\\n...\\n</tool_call>' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|observation|>' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- else %}
{{- '<|' + message.role + '|>\\n' + (message.content or '') }}
{%- for call in (message.tool_calls or []) %}
{%- set call = call.function if call.function is defined else call %}
{{- '\\n<tool_call>' + call.name + '\\n' }}
{%- for key, value in ((call.arguments | items) if call.arguments is mapping else []) %}
{{- '<arg_key>' + key + '</arg_key>\\n<arg_value>' + (value if value is string else (value | tojson)) + '</arg_value>\\n' }}
{%- endfor %}
{{- '</tool_call>' }}
{%- endfor %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}
"""

# DeepSeek-V3.1's turn format (its released template, thinking aside): the system text (and the tools' listing) after
# the begin token, then <｜User｜> and <｜Assistant｜> turns, a reply ended by <｜end▁of▁sentence｜>; calls as
# <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>, results
# between <｜tool▁output▁begin｜> and <｜tool▁output▁end｜>
DEEPSEEK_V3_CHAT_TEMPLATE = """\
{{ bos_token }}{% if tools %}## Tools
You have access to the following tools:
{% for tool in tools %}
### {{ tool.function.name }}
Description: {{ tool.function.description }}

Parameters: {{ tool.function.parameters | tojson }}
{% endfor %}
IMPORTANT: ALWAYS adhere to this exact format for tool use:
<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>tool_call_name<｜tool▁sep｜>tool_call_arguments<｜tool▁call▁end｜>\
{{ '{{additional_tool_calls}}' }}<｜tool▁calls▁end｜>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}{{ message.content }}
{%- elif message.role == 'user' %}<｜User｜>{{ message.content }}
{%- elif message.role == 'assistant' and message.tool_calls %}<｜Assistant｜>{{ message.content or '' }}\
<｜tool▁calls▁begin｜>{% for call in message.tool_calls %}<｜tool▁call▁begin｜>{{ call.function.name }}<｜tool▁sep｜>\
{{ call.function.arguments | tojson }}<｜tool▁call▁end｜>{% endfor %}<｜tool▁calls▁end｜>{{ eos_token }}
{%- elif message.role == 'tool' %}<｜tool▁output▁begin｜>{{ message.content }}<｜tool▁output▁end｜>
{%- elif message.role == 'assistant' %}<｜Assistant｜>{{ message.content }}{{ eos_token }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<｜Assistant｜>{% endif %}"""

# MiniMax-M2's turn format (its released template, thinking aside): ]~b]ROLE, the text, [e~[; the assistant's role
# is "ai"; tools listed in a system turn between <tools> and </tools>, calls as <minimax:tool_call> blocks of
# <invoke name="NAME"> with <parameter name="KEY">VALUE</parameter> lines (a string value raw, others as JSON),
# results in a tool turn between <response> and </response>
MINIMAX_M2_CHAT_TEMPLATE = """\
]~!b[
{%- if tools %}]~b]system
# Tools
<tools>
{% for tool in tools %}<tool>{{ tool.function | tojson }}</tool>
{% endfor %}</tools>
When making tool calls, use XML format to invoke tools and pass parameters:
<minimax:tool_call>
<invoke name="tool-name-1">
<parameter name="param-key-1">param-value-1</parameter>
</invoke>
</minimax:tool_call>[e~[
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}]~b]ai
{{ message.content or '' }}
{%- if message.tool_calls %}
{%- for call in message.tool_calls %}<minimax:tool_call>
<invoke name="{{ call.function.name }}">
{% for key, value in call.function.arguments.items() %}<parameter name="{{ key }}">\
{{ value if value is string else (value | tojson) }}</parameter>
{% endfor %}</invoke>
</minimax:tool_call>{% endfor %}
{%- endif %}[e~[
{% elif message.role == 'tool' %}]~b]tool
<response>{{ message.content }}</response>[e~[
{% else %}]~b]{{ message.role }}
{{ message.content }}[e~[
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}]~b]ai
{% endif %}"""

# GPT-OSS's harmony format, its plainest part: <|start|>ROLE<|message|>TEXT<|end|> per turn, the reply after
# <|start|>assistant; tools listed in a developer turn (the real template writes them as a TypeScript namespace, and
# adds the system preamble and the reasoning effort), calls as commentary to=functions.NAME with JSON arguments,
# results as a message from functions.NAME; a reply ends at <|return|> or <|call|>
GPT_OSS_CHAT_TEMPLATE = """\
{%- if tools %}<|start|>developer<|message|># Tools

namespace functions {
{%- for tool in tools %}{% set f = tool.function if tool.function is defined else tool %}
type {{ f.name }} = (_: {{ f.parameters | tojson }}) => any;
{%- endfor %}
} // namespace functions<|end|>{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}
{%- for call in message.tool_calls %}<|start|>assistant<|channel|>commentary to=functions.{{ call.function.name }} \
<|constrain|>json<|message|>{{ call.function.arguments | tojson }}<|call|>{% endfor %}
{%- elif message.role == 'tool' %}<|start|>functions.{{ message.name or 'tool' }} to=assistant<|channel|>commentary\
<|message|>{{ message.content }}<|end|>
{%- elif message.role == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ message.content }}<|end|>
{%- else %}<|start|>{{ message.role }}<|message|>{{ message.content }}<|end|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start|>assistant{% endif %}"""

# Kimi-K2's format (its released template, simplified): <|im_ROLE|>ROLE<|im_middle|>TEXT<|im_end|> turns, tools declared
# in a tool_declare system turn as JSON, calls in a section, each <|tool_call_begin|>ID<|tool_call_argument_begin|>JSON
# <|tool_call_end|> with ID functions.NAME:INDEX, results in a tool turn headed "## Return of ID"
KIMI_K2_CHAT_TEMPLATE = """\
{%- if tools %}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}<|im_system|>system<|im_middle|>{{ message.content }}<|im_end|>
{%- elif message.role == 'user' %}<|im_user|>user<|im_middle|>{{ message.content }}<|im_end|>
{%- elif message.role == 'assistant' %}<|im_assistant|>assistant<|im_middle|>{{ message.content or '' }}
{%- if message.tool_calls %}<|tool_calls_section_begin|>{% for call in message.tool_calls %}<|tool_call_begin|>\
{{ call.id }}<|tool_call_argument_begin|>{{ call.function.arguments | tojson }}<|tool_call_end|>{% endfor %}\
<|tool_calls_section_end|>{% endif %}<|im_end|>
{%- elif message.role == 'tool' %}<|im_system|>tool<|im_middle|>## Return of {{ message.tool_call_id }}
{{ message.content }}<|im_end|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}"""

"""Tools through a JSON grammar for templates without tool syntax: pure functions."""

from __future__ import annotations

import json

import jsonschema

from helexa.protocol import GenerateRequest, Task, ToolChoice, ToolChoiceMode, ToolSpec
from helexa.runtime import tool_grammar

WEATHER = ToolSpec("get_weather", "Get the weather", {"type": "object", "properties": {"city": {"type": "string"}},
                                                      "required": ["city"]})
TIME = ToolSpec("get_time", None, None)


def request(mode: ToolChoiceMode | None, name: str | None = None, messages=None) -> GenerateRequest:
    return GenerateRequest("r", "m", Task.CHAT, messages=tuple(messages or [{"role": "user", "content": "hi"}]),
                           tools=(WEATHER, TIME), tool_choice=ToolChoice(mode, name) if mode else None)


def test_required_allows_only_a_call_to_one_of_the_tools() -> None:
    schema = tool_grammar.schema(request(ToolChoiceMode.REQUIRED))
    jsonschema.validate({"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}, schema)
    jsonschema.validate({"tool_call": {"name": "get_time", "arguments": {}}}, schema)
    for wrong in ({"response": "hi"}, {"tool_call": {"name": "get_weather", "arguments": {}}},
                  {"tool_call": {"name": "rm_rf", "arguments": {}}}):
        try:
            jsonschema.validate(wrong, schema)
        except jsonschema.ValidationError:
            continue
        raise AssertionError(f"{wrong} should not validate")


def test_a_tool_without_parameters_takes_no_arguments() -> None:
    """OpenAI: omitting ``parameters`` defines a function with an empty parameter list."""
    schema = tool_grammar.schema(request(ToolChoiceMode.FUNCTION, "get_time"))
    jsonschema.validate({"tool_call": {"name": "get_time", "arguments": {}}}, schema)
    try:
        jsonschema.validate({"tool_call": {"name": "get_time", "arguments": {"format": "YYYYMMDD"}}}, schema)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("invented arguments were allowed")


def test_a_named_function_and_auto() -> None:
    named = tool_grammar.schema(request(ToolChoiceMode.FUNCTION, "get_time"))
    assert named["properties"]["tool_call"]["properties"]["name"]["const"] == "get_time"
    auto = tool_grammar.schema(request(ToolChoiceMode.AUTO))
    jsonschema.validate({"response": "Hello"}, auto)
    assert "response" in tool_grammar.instructions(request(ToolChoiceMode.AUTO))
    assert "response" not in tool_grammar.instructions(request(ToolChoiceMode.REQUIRED))


def test_the_conversation_shows_tools_calls_and_results_as_plain_messages() -> None:
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "rain"}]}]
    out = tool_grammar.prepare(request(ToolChoiceMode.AUTO, messages=history))
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\nYou can call these tools")
    assert json.loads(out[2]["content"]) == {"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    assert out[3] == {"role": "tool", "content": "rain"}


def test_answers_are_read_back_as_tool_calls_or_content() -> None:
    call = tool_grammar.parse('{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}')
    (whole,) = call.tool_calls
    assert whole["type"] == "function" and whole["id"].startswith("call_")
    assert whole["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert tool_grammar.parse('{"response": "Hi there"}') == tool_grammar.Parsed("Hi there")


def test_an_answer_cut_short_never_shows_its_json_as_content() -> None:
    # A tool call cut by max_tokens is no content (the finish reason, length, says it was cut).
    assert tool_grammar.parse('{"tool_call": {"name": "get_w') == tool_grammar.Parsed("")
    assert tool_grammar.parse('{\n  "') == tool_grammar.Parsed("")
    assert tool_grammar.parse("") == tool_grammar.Parsed("")
    # A direct answer cut short keeps what it said, as plain text cut short does.
    assert tool_grammar.parse('{"response": "Hi th') == tool_grammar.Parsed("Hi th")
    assert tool_grammar.parse('{ "response" : "Hi\\u00') == tool_grammar.Parsed("Hi")  # half an escape: dropped
    assert tool_grammar.parse('{"response": "say \\"hi\\"",') == tool_grammar.Parsed('say "hi"')


def test_each_tools_local_definitions_move_to_the_root_renamed_with_their_refs() -> None:
    import jsonschema

    address = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    send = {"$defs": {"Addr": address}, "type": "object",
            "properties": {"to": {"$ref": "#/$defs/Addr"}, "cc": {"type": "array", "items": {"$ref": "#/$defs/Addr"}}}}
    bill = {"definitions": {"Addr": {"type": "integer"}}, "type": "object",
            "properties": {"n": {"$ref": "#/definitions/Addr"}}}
    request = GenerateRequest("r", "m", Task.CHAT, messages=({"role": "user", "content": "hi"},),
                              tools=(ToolSpec("send", None, send), ToolSpec("bill", None, bill)),
                              tool_choice=ToolChoice(ToolChoiceMode.REQUIRED))
    schema = tool_grammar.schema(request)
    assert set(schema["$defs"]) == {"t0_Addr", "t1_Addr"}
    check = jsonschema.Draft202012Validator(schema)
    assert check.is_valid({"tool_call": {"name": "send",
                                         "arguments": {"to": {"city": "Oslo"}, "cc": [{"city": "Rome"}]}}})
    assert not check.is_valid({"tool_call": {"name": "send", "arguments": {"to": {"town": "Oslo"}}}})
    assert check.is_valid({"tool_call": {"name": "bill", "arguments": {"n": 3}}})
    assert not check.is_valid({"tool_call": {"name": "bill", "arguments": {"n": {"city": "Oslo"}}}})


def test_a_tools_pointer_into_its_own_schema_moves_with_it() -> None:
    defs = {"Addr": {"type": "object", "properties": {"city": {"$ref": "#/properties/name"}}}}
    send = {"$defs": defs, "type": "object",
            "properties": {"name": {"type": "string"}, "alias": {"$ref": "#/properties/name"},
                           "home": {"$ref": "#/$defs/Addr"}}}
    plain = {"type": "object", "properties": {"n": {"type": "integer"}}}
    request = GenerateRequest("r", "m", Task.CHAT, messages=({"role": "user", "content": "hi"},),
                              tools=(ToolSpec("plain", None, plain), ToolSpec("send", None, send)))
    schema = tool_grammar.schema(request)
    assert set(schema["$defs"]) == {"t1_Addr", "t1_arguments"}  # a tool with no such pointer stays in place
    assert schema["$defs"]["t1_arguments"]["properties"]["alias"] == {"$ref": "#/$defs/t1_arguments/properties/name"}
    assert schema["$defs"]["t1_Addr"]["properties"]["city"] == {"$ref": "#/$defs/t1_arguments/properties/name"}
    check = jsonschema.Draft202012Validator(schema)
    call = {"name": "send", "arguments": {"name": "a", "alias": "b", "home": {"city": "Oslo"}}}
    assert check.is_valid({"tool_call": call})
    assert not check.is_valid({"tool_call": {**call, "arguments": {"alias": 3}}})
    assert check.is_valid({"tool_call": {"name": "plain", "arguments": {"n": 1}}})

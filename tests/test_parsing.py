"""turnrl.parse_tool_calls against the plain Python reference in
parsing_reference.py, plus explicit cases for each kind of messy output."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parsing_reference import parse as ref_parse
from strict import strict_equal

import turnrl

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "book",
            "parameters": {
                "type": "object",
                "properties": {
                    "count": {"type": "integer"},
                    "price": {"type": "number"},
                    "zip": {"type": "string"},
                    "ok": {"type": "boolean"},
                    "items": {"type": "array"},
                    "meta": {"type": "object"},
                    "maybe": {"type": ["integer", "null"]},
                },
            },
        },
    },
    {"name": "lookup", "parameters": {"properties": {"id": {"type": "string"}}}},
]


def assert_matches_reference(
    text: str, fmt: str = "auto", tools: list[dict[str, Any]] | None = None
) -> turnrl.ParsedMessage:
    got = turnrl.parse_tool_calls(text, fmt, tools)
    want = ref_parse(text, fmt, tools)
    assert got.content == want["content"]
    assert got.reasoning == want["reasoning"]
    assert strict_equal(got.tool_calls, want["tool_calls"]), (got.tool_calls, want["tool_calls"])
    assert got.error_offsets == want["error_offsets"]
    assert got.call_offsets == want["call_offsets"]
    assert len(got.errors) == len(got.error_offsets)
    n_bytes = len(text.encode())
    for msg, off in zip(got.errors, got.error_offsets, strict=False):
        assert f"byte {off}:" in msg
        assert 0 <= off < n_bytes
    return got


def call(name: str, args: Any, **extra: Any) -> str:
    return (
        "<tool_call>\n" + json.dumps({"name": name, "arguments": args, **extra}) + "\n</tool_call>"
    )


# --- explicit cases ---------------------------------------------------------


def test_several_calls_with_prose_around() -> None:
    text = "I'll look.\n" + call("a", {"x": 1}) + "\nand\n" + call("b", {"y": [1.5, None]}) + " end"
    m = assert_matches_reference(text)
    assert m.tool_calls == [
        {"name": "a", "arguments": {"x": 1}},
        {"name": "b", "arguments": {"y": [1.5, None]}},
    ]
    assert m.content == "I'll look.\n\nand\n end"
    assert m.reasoning is None
    assert m.errors == []


def test_reasoning_is_apart_and_calls_inside_it_are_not_calls() -> None:
    text = "<think>maybe " + call("hidden", {}) + "</think>\nSure. " + call("shown", {"k": "v"})
    m = assert_matches_reference(text)
    assert [c["name"] for c in m.tool_calls] == ["shown"]
    assert m.reasoning is not None and "hidden" in m.reasoning
    assert m.content == "Sure."


def test_reasoning_opened_in_the_prompt() -> None:
    m = assert_matches_reference("plan it</think>\n\nanswer")
    assert m.reasoning == "plan it"
    assert m.content == "answer"


def test_reasoning_cut_off() -> None:
    m = assert_matches_reference("<think>still thinking " + call("x", {}))
    assert m.tool_calls == [] and m.errors == []
    assert m.reasoning is not None and m.reasoning.startswith("still thinking")


def test_think_close_inside_a_call_is_text_of_the_call() -> None:
    """Reasoning ends at the first </think> outside calls: one in a call's
    arguments neither ends reasoning begun in the prompt nor loses the call."""
    note = {"name": "note", "arguments": {"text": "a </think> b"}}
    text = "<tool_call>" + json.dumps(note) + "</tool_call>"
    for fmt in ["auto", "hermes"]:
        m = assert_matches_reference(text, fmt)
        assert (m.content, m.reasoning, m.tool_calls, m.errors) == ("", None, [note], [])
        assert m.call_offsets == [0]
        # Reasoning before the call, begun in the prompt or in a block.
        for lead in ["plan</think>", "<think>plan</think>"]:
            m = assert_matches_reference(lead + "Sure. " + text, fmt)
            assert (m.reasoning, m.content, m.tool_calls) == ("plan", "Sure.", [note])
        # A call written in reasoning stays reasoning, whole.
        for lead in ["", "<think>"]:
            m = assert_matches_reference(lead + "maybe " + text + " no</think>Done.", fmt)
            assert m.reasoning == "maybe " + text + " no"
            assert (m.content, m.tool_calls, m.errors) == ("Done.", [], [])
        # Cut off at the end of generation: still a call (an error), and its
        # offset is where it starts.
        cut = "ok " + text[: text.index(" b")]
        m = assert_matches_reference(cut, fmt)
        assert (m.content, m.reasoning, m.tool_calls, m.error_offsets) == ("ok", None, [], [3])
        # A <tool_call> that the next one ends holds no call: its </think> counts.
        m = assert_matches_reference("I use <tool_call> tags.</think>" + text, fmt)
        assert (m.reasoning, m.tool_calls) == ("I use <tool_call> tags.", [note])
    # Qwen3-Coder XML, with or without the <tool_call> tags around it.
    block = "<function=note><parameter=text>a </think> b</parameter></function>"
    for call_text in [block, "<tool_call>\n" + block + "\n</tool_call>"]:
        for fmt in ["auto", "qwen3_coder"]:
            m = assert_matches_reference(call_text, fmt)
            assert (m.reasoning, m.tool_calls, m.errors) == (None, [note], [])
            m = assert_matches_reference("plan</think>" + call_text, fmt)
            assert (m.reasoning, m.tool_calls) == ("plan", [note])
    # The batch form reads the same.
    texts = [text, "plan</think>" + text, block, "x " + text[:-5]]
    assert turnrl.parse_tool_calls_batch(texts) == [turnrl.parse_tool_calls(t) for t in texts]


def test_reply_from_text_keeps_a_call_with_think_close_in_its_arguments() -> None:
    from turnrl.envs.agents import reply_from_text

    text = '<tool_call>{"name": "note", "arguments": {"text": "a </think> b"}}</tool_call>'
    reply = reply_from_text(text)
    assert reply["tool_calls"] == [{"name": "note", "arguments": {"text": "a </think> b"}}]
    assert (reply["content"], reply["reasoning"], reply["completion"]) == ("", None, text)


def test_final_call_cut_off_with_complete_json_parses() -> None:
    m = assert_matches_reference('ok <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n')
    assert m.tool_calls == [{"name": "f", "arguments": {"a": 1}}]
    assert m.content == "ok"


def test_final_call_cut_off_mid_json_is_one_error() -> None:
    text = call("good", {"a": 1}) + ' then <tool_call>\n{"name": "f", "arguments": {"a":'
    m = assert_matches_reference(text)
    assert m.tool_calls == [{"name": "good", "arguments": {"a": 1}}]
    assert m.error_offsets == [
        len(text.encode()) - len('<tool_call>\n{"name": "f", "arguments": {"a":')
    ]
    assert "invalid JSON" in m.errors[0]


def test_code_fence_inside_the_tags() -> None:
    for fence in ("```json\n", "```\n", "```JSON "):
        text = "<tool_call>" + fence + '{"name": "f", "arguments": {"a": [1]}}\n```</tool_call>'
        m = assert_matches_reference(text)
        assert m.tool_calls == [{"name": "f", "arguments": {"a": [1]}}], fence


def test_arguments_encoded_as_a_string() -> None:
    text = (
        '<tool_call>{"name": "f", '
        '"arguments": "{\\"a\\": 2, \\"b\\": {\\"c\\": true}}"}</tool_call>'
    )
    m = assert_matches_reference(text)
    assert m.tool_calls == [{"name": "f", "arguments": {"a": 2, "b": {"c": True}}}]


def test_arguments_missing_null_or_blank_is_empty() -> None:
    for body in (
        '{"name": "f"}',
        '{"name": "f", "arguments": null}',
        '{"name": "f", "arguments": " "}',
    ):
        m = assert_matches_reference(f"<tool_call>{body}</tool_call>")
        assert m.tool_calls == [{"name": "f", "arguments": {}}], body


def test_parameters_alias_and_unknown_keys() -> None:
    text = (
        '<tool_call>{"id": "c1", "type": "function", "name": "f", '
        '"parameters": {"a": 1}}</tool_call>'
    )
    m = assert_matches_reference(text)
    assert m.tool_calls == [{"name": "f", "arguments": {"a": 1}}]


@pytest.mark.parametrize(
    "body",
    [
        '{"arguments": {}}',
        '{"name": 3}',
        '{"name": ""}',
        '["f", {}]',
        '{"name": "f", "arguments": [1]}',
        '{"name": "f", "arguments": "not json"}',
        '{"name": "f", "arguments": "[1]"}',
        '{"name": "f"}}',
        "",
    ],
)
def test_one_malformed_call_among_good_ones(body: str) -> None:
    good = call("ok", {"n": 1})
    text = good + " <tool_call>" + body + "</tool_call> " + good
    m = assert_matches_reference(text)
    assert len(m.tool_calls) == 2
    assert m.error_offsets == [len(good.encode()) + 1]
    assert len(m.errors) == 1


def test_error_offsets_are_bytes_not_characters() -> None:
    text = "héllo ✓ <tool_call>{bad}</tool_call>"
    m = assert_matches_reference(text)
    assert m.error_offsets == [text.encode().index(b"<tool_call>")]


def test_qwen3_coder_xml_typed_by_schema() -> None:
    text = (
        "Booking now.\n<tool_call>\n<function=book>\n"
        "<parameter=count>\n2\n</parameter>\n<parameter=price>\n10\n</parameter>\n"
        "<parameter=zip>\n01234\n</parameter>\n<parameter=ok>\nTrue\n</parameter>\n"
        '<parameter=items>\n["a", 1]\n</parameter>\n<parameter=meta>\n{"k": null}\n</parameter>\n'
        "<parameter=maybe>\nnull\n</parameter>\n<parameter=other>\n7\n</parameter>\n"
        "</function>\n</tool_call>"
    )
    m = assert_matches_reference(text, tools=TOOLS)
    assert m.tool_calls == [
        {
            "name": "book",
            "arguments": {
                "count": 2,
                "price": 10,
                "zip": "01234",
                "ok": True,
                "items": ["a", 1],
                "meta": {"k": None},
                "maybe": None,
                "other": 7,
            },
        }
    ]
    assert m.content == "Booking now."


def test_qwen3_coder_types_from_any_of_and_enum_schemas() -> None:
    """pydantic writes Optional[str] as anyOf, and enums need no "type": a
    number-looking value of such a string parameter stays a string."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "find",
                "parameters": {
                    "properties": {
                        "zip": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                        "count": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                        "cabin": {"enum": ["1", "2"]},
                        "level": {"enum": [1, 2]},
                        "kind": {"const": "x"},
                    }
                },
            },
        }
    ]
    text = (
        "<tool_call>\n<function=find>\n<parameter=zip>\n12345\n</parameter>\n"
        "<parameter=count>\n5\n</parameter>\n<parameter=cabin>\n1\n</parameter>\n"
        "<parameter=level>\n2\n</parameter>\n<parameter=kind>\n7\n</parameter>\n"
        "</function>\n</tool_call>"
    )
    m = assert_matches_reference(text, tools=tools)
    assert m.tool_calls[0]["arguments"] == {
        "zip": "12345",
        "count": 5,
        "cabin": "1",
        "level": 2,
        "kind": "7",
    }
    nothing = (
        "<tool_call>\n<function=find>\n<parameter=zip>\nnull\n</parameter>\n"
        "</function>\n</tool_call>"
    )
    assert assert_matches_reference(nothing, tools=tools).tool_calls[0]["arguments"] == {
        "zip": None
    }


def test_qwen3_coder_optional_model_is_not_typed_as_null_only() -> None:
    """pydantic's Optional[Model]: {"anyOf": [{"$ref": ...}, {"type": "null"}]}.
    The $ref branch allows an object or array, so an object reads as a dict,
    as it would with no schema, instead of staying a string; a scalar stays
    a string (the $ref may be a string enum)."""
    address = {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}], "default": None}
    tools = [
        {
            "name": "update",
            "parameters": {
                "properties": {"address": address, "tag": {"anyOf": [{"type": "string"}, {}]}},
                "$defs": {"Address": {"type": "object"}},
            },
        }
    ]

    def typed(value: str, key: str = "address") -> Any:
        text = f"<function=update><parameter={key}>\n{value}\n</parameter></function>"
        return assert_matches_reference(text, tools=tools).tool_calls[0]["arguments"][key]

    assert typed('{"city": "Paris", "zip": "75001"}') == {"city": "Paris", "zip": "75001"}
    assert typed("null") is None
    assert typed("Paris") == "Paris"
    assert typed("5") == "5" and typed("true") == "true"
    # A string branch listed first still takes every value.
    assert typed("12", key="tag") == "12"


def test_qwen3_coder_without_schema_and_without_outer_tags() -> None:
    text = (
        "x <function=lookup><parameter=id>42</parameter>"
        "<parameter=q>hi there</parameter></function> y"
    )
    m = assert_matches_reference(text, fmt="qwen3_coder")
    assert m.tool_calls == [{"name": "lookup", "arguments": {"id": 42, "q": "hi there"}}]
    m = assert_matches_reference(text, fmt="qwen3_coder", tools=TOOLS)
    assert m.tool_calls == [{"name": "lookup", "arguments": {"id": "42", "q": "hi there"}}]
    assert m.content == "x  y"
    # Hermes mode does not read bare XML blocks.
    assert turnrl.parse_tool_calls(text, "hermes").tool_calls == []


def test_qwen3_coder_cut_off_parameter_is_an_error() -> None:
    text = "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\npart"
    m = assert_matches_reference(text)
    assert m.tool_calls == [] and m.error_offsets == [0]


def test_bare_function_block_left_open_does_not_swallow_later_calls() -> None:
    json_call = call("get_user_details", {"user_id": "mia_li_3668"})
    # Prose naming the tag: one error at the tag, no call named "NAME", and
    # the real call after it survives.
    text = "The model writes <function=NAME> tags; I will use JSON instead.\n" + json_call
    m = assert_matches_reference(text)
    assert m.tool_calls == [{"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}]
    assert m.error_offsets == [text.index("<function=")]
    assert "not closed before <tool_call>" in m.errors[0]
    # A forgotten </function> before a JSON call, or before reasoning.
    text = "<function=cancel>\n<parameter=id>\nZFA04Y\n</parameter>\n" + json_call
    m = assert_matches_reference(text, tools=TOOLS)
    assert [c["name"] for c in m.tool_calls] == ["get_user_details"] and m.error_offsets == [0]
    m = assert_matches_reference("<function=f><parameter=a>1</parameter>\n<think>r</think>done")
    assert (m.tool_calls, m.error_offsets, m.reasoning, m.content) == ([], [0], "r", "done")
    # Cut off at the end of generation: read as before (a call when its
    # parameters are whole), and so is a closer forgotten before <function=.
    m = assert_matches_reference("<function=f><parameter=a>1</parameter>")
    assert m.tool_calls == [{"name": "f", "arguments": {"a": 1}}] and m.errors == []
    m = assert_matches_reference("<function=f><parameter=a>1</parameter><function=g></function>")
    assert [c["name"] for c in m.tool_calls] == ["f", "g"] and m.errors == []
    # No call runs over a <tool_call>, even one a later </function> would
    # close; a closed block keeps a <think> in a value as text.
    m = assert_matches_reference("<function=f>\n" + json_call + "\n</function>")
    assert [c["name"] for c in m.tool_calls] == ["get_user_details"] and m.error_offsets == [0]
    m = assert_matches_reference("<function=f><parameter=a><think></parameter></function>")
    assert m.tool_calls == [{"name": "f", "arguments": {"a": "<think>"}}] and m.reasoning is None


def test_every_tool_call_tag_outside_reasoning_is_a_call_or_an_error() -> None:
    # Fragments that mix both formats: no <tool_call> may vanish into
    # another call (each becomes a call or an error at its own offset).
    frags = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<function=f>", "</function>"]
    frags += ["<parameter=a>1", "</parameter>", '{"name": "f", "arguments": {"a": 1}}', "\n", "x"]

    @settings(max_examples=1500, deadline=None)
    @given(st.lists(st.sampled_from(frags), max_size=12))
    def check(parts: list[str]) -> None:
        text = "".join(parts)
        m = assert_matches_reference(text)
        outside = text.count("<tool_call>") - (m.reasoning or "").count("<tool_call>")
        outside -= m.content.count("<tool_call>")
        raw = text.encode()
        read = [o for o in m.call_offsets + m.error_offsets if raw.startswith(b"<tool_call>", o)]
        assert len(read) == outside, (text, m.to_dict())

    check()


def test_xml_values_nested_too_deep_for_the_arguments_stay_strings() -> None:
    # A value is written into its call's arguments, one level deeper, which
    # must read back within serde_json's 127 levels: reading .tool_calls never
    # raises, and the other calls are kept.
    tools = [{"name": "f", "parameters": {"properties": {"a": {"type": "array"}}}}]
    for depth in (126, 127, 128):
        value = "[" * depth + "]" * depth
        text = call("ok", {}) + "<function=f><parameter=a>" + value + "</parameter></function>"
        want: Any = json.loads(value) if depth <= 126 else value
        for schemas in (None, tools):
            m = assert_matches_reference(text, tools=schemas)
            assert m.tool_calls == [
                {"name": "ok", "arguments": {}},
                {"name": "f", "arguments": {"a": want}},
            ], depth
            assert m.errors == [] and len(repr(m)) > depth
            assert m.to_dict()["tool_calls"] == m.tool_calls
            batch = turnrl.parse_tool_calls_batch([text] * 20, tools=schemas)
            assert all(b.tool_calls == m.tool_calls for b in batch)


def test_formats_are_checked() -> None:
    with pytest.raises(turnrl.UnknownNameError):
        turnrl.parse_tool_calls("x", "xml")  # type: ignore[arg-type]
    with pytest.raises(turnrl.InvalidInputError):
        turnrl.parse_tool_calls("x", tools=[{"parameters": {}}])


def test_batch_equals_single_and_message_is_frozen() -> None:
    texts = ["", "plain", call("a", {"b": [1, {"c": 2.5}]}), "<tool_call>{", "<think>x</think>y"]
    batch = turnrl.parse_tool_calls_batch(texts * 20, tools=TOOLS)
    for t, m in zip(texts * 20, batch, strict=False):
        single = turnrl.parse_tool_calls(t, tools=TOOLS)
        assert m == single
        assert m.to_dict() == single.to_dict()
    with pytest.raises(AttributeError):
        batch[0].content = "changed"  # type: ignore[misc]


# --- generated messages against the reference ---------------------------------

PROSE = st.lists(
    st.sampled_from(
        [
            *'abc xyz\n\t.,é漢✓{}[]"<>/=_',
            "<tool_call>",
            "</tool_call>",
            "<think>",
            "</think>",
            "<function=",
            "</function>",
        ]
    ),
    max_size=30,
).map("".join)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.integers()  # beyond 64 bits too: ints stay exact
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
ARGS = st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4)


@st.composite
def hermes_call(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(["book", "lookup", "x"]))
    args = draw(ARGS)
    style = draw(st.sampled_from(["plain", "string_args", "missing", "alias", "extra", "fence"]))
    obj: dict[str, Any] = {"name": name}
    if style == "string_args":
        obj["arguments"] = json.dumps(args)
    elif style == "alias":
        obj["parameters"] = args
    elif style != "missing":
        obj["arguments"] = args
    if style == "extra":
        obj["id"] = draw(JSON_VALUES)
    body = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    if style == "fence":
        body = "```json\n" + body + "\n```"
    return "<tool_call>\n" + body + "\n</tool_call>"


XML_VALUES = st.one_of(
    st.integers(-1000, 1000).map(str),
    st.integers().map(str),  # beyond 64 bits too
    st.integers().map(lambda n: json.dumps({"n": n})),
    st.sampled_from(["true", "False", "null", "1.5", "[1, 2]", '{"a": 1}', "01234", " x "]),
    st.text(alphabet="ab c\n", max_size=8),
)


@st.composite
def xml_call(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(["book", "lookup", "x"]))
    keys = draw(
        st.lists(
            st.sampled_from(["count", "price", "zip", "ok", "items", "meta", "maybe", "id", "q"]),
            max_size=4,
        )
    )
    params = "".join(f"<parameter={k}>\n{draw(XML_VALUES)}\n</parameter>\n" for k in keys)
    block = f"<function={name}>\n{params}</function>"
    return block if draw(st.booleans()) else "<tool_call>\n" + block + "\n</tool_call>"


# Calls with reasoning tags in their values, which are text of the call.
THINK_CALLS = [
    '<tool_call>{"name": "x", "arguments": {"t": "a </think> <think> b"}}</tool_call>',
    "<tool_call>\n<function=x>\n<parameter=t>\n</think>\n</parameter>\n</function>\n</tool_call>",
    "<function=x><parameter=t></think></parameter></function>",
]


@st.composite
def message(draw: st.DrawFn) -> str:
    parts: list[str] = []
    think = draw(st.sampled_from(["none", "block", "prompt_opened", "unclosed"]))
    if think == "block":
        parts.append("<think>" + draw(PROSE) + "</think>")
    elif think == "prompt_opened":
        parts.append(draw(PROSE).replace("<think>", "") + "</think>")
    parts.append(draw(PROSE))
    for _ in range(draw(st.integers(0, 3))):
        parts.append(draw(hermes_call() | xml_call() | st.sampled_from(THINK_CALLS)))
        parts.append(draw(PROSE))
    if think == "unclosed":
        parts.insert(draw(st.integers(0, len(parts))), "<think>")
    text = "".join(parts)
    mutation = draw(st.sampled_from(["none", "none", "truncate", "break_one"]))
    if mutation == "truncate" and text:
        text = text[: draw(st.integers(0, len(text)))]
    elif mutation == "break_one" and "<tool_call>" in text:
        at = text.index("<tool_call>") + len("<tool_call>") + draw(st.integers(0, 30))
        text = text[:at] + draw(st.sampled_from(["{", "}", '"', "<", "x"])) + text[at:]
    return text


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(message(), st.sampled_from(["auto", "hermes", "qwen3_coder"]), st.booleans())
def test_generated_messages_match_reference(text: str, fmt: str, with_tools: bool) -> None:
    assert_matches_reference(text, fmt, TOOLS if with_tools else None)


@FAST
@given(st.text(max_size=200))
def test_arbitrary_text_matches_reference(text: str) -> None:
    assert_matches_reference(text)


@settings(max_examples=50, deadline=None)
@given(st.lists(message(), max_size=40))
def test_batch_equals_single(texts: list[str]) -> None:
    batch = turnrl.parse_tool_calls_batch(texts, "auto", TOOLS)
    assert batch == [turnrl.parse_tool_calls(t, "auto", TOOLS) for t in texts]


def test_long_message_takes_the_detached_path() -> None:
    # Messages of 16 KiB and more are parsed with the GIL released.
    text = ("word " * 4000) + call("f", {"a": "é" * 100}) + "<tool_call>{oops</tool_call>"
    m = assert_matches_reference(text, tools=TOOLS)
    assert len(m.tool_calls) == 1 and len(m.errors) == 1


def test_json_arguments_are_decoded_like_json_loads() -> None:
    # JSON arguments are decoded straight from the message into Python
    # objects on first access: same types, key order, escapes and repeated
    # keys (last value, first position) as json.loads.
    args = (
        '{"b": 1, "a": -2, "big": 18446744073709551615, "f": 2.50, "e": 1e5, "zero": -0.0,'
        ' "s": "\\u00e9\\ud83d\\ude00\\" x", "n": null, "l": [true, {"k": []}], "b": 3}'
    )
    m = turnrl.parse_tool_calls(f'<tool_call>{{"name": "f", "arguments": {args}}}</tool_call>')
    assert strict_equal(m.tool_calls[0]["arguments"], json.loads(args))
    reordered = f'<tool_call>{{"arguments": {args}, "name": "f"}}</tool_call>'
    assert m == turnrl.parse_tool_calls(reordered)


def test_integers_beyond_64_bits_stay_exact() -> None:
    # serde_json reads such integers as floats; Python (and vLLM) keep them.
    big = 123456789012345678901234567890
    hermes = call("f", {"a": big, "b": -(2**63) - 1, "c": [{"d": 2**64}], "e": 1e20})
    encoded = call("f", json.dumps({"a": big}))
    xml = (
        f"<function=book><parameter=count>{big}</parameter>"
        f'<parameter=meta>{{"n": {big}}}</parameter><parameter=q>{big}</parameter></function>'
    )
    for text in (hermes, encoded, xml):
        got = assert_matches_reference(text, tools=TOOLS)
        assert got.tool_calls and not got.errors, got
    assert turnrl.parse_tool_calls(hermes).tool_calls[0]["arguments"]["a"] == big
    assert type(turnrl.parse_tool_calls(xml, tools=TOOLS).tool_calls[0]["arguments"]["q"]) is int


def test_lone_surrogates_are_rejected_clearly() -> None:
    with pytest.raises(UnicodeEncodeError):
        turnrl.parse_tool_calls("bad \ud800 text")


def test_repeated_keys_and_names_are_shared_str_objects() -> None:
    # Keys and tool names come from a per-thread cache: the same str object
    # in every message, with its hash already computed.
    first = turnrl.parse_tool_calls(call("lookup", {"reservation_id": "A", "n": 1}))
    second = turnrl.parse_tool_calls(call("lookup", {"n": 2, "reservation_id": "B"}))
    (a,), (b,) = first.tool_calls, second.tool_calls
    assert a["name"] is b["name"]
    key_a = next(k for k in a["arguments"] if k == "reservation_id")
    key_b = next(k for k in b["arguments"] if k == "reservation_id")
    assert key_a is key_b


def test_key_cache_evictions_and_odd_keys_keep_results_exact() -> None:
    # Far more distinct keys than the cache has slots, each met several
    # times, plus keys the cache does not hold (long) or that need decoding.
    rng = random.Random(7)
    names = [f"k{i}" for i in range(3000)] + ["x" * 65, "x" * 64, "é", 'a"b', "", "\u2028"]
    for _ in range(300):
        keys = rng.sample(names, 12)
        args = {k: rng.choice([1, "v", None, [k], {k: k}]) for k in keys}
        m = turnrl.parse_tool_calls(call(rng.choice(names) or "f", args))
        assert strict_equal(m.tool_calls[0]["arguments"], args)
        assert [*m.tool_calls[0]["arguments"]] == keys


def test_threads_parse_the_same_as_one_thread() -> None:
    from concurrent.futures import ThreadPoolExecutor

    texts = [call(f"tool{i % 7}", {f"key{i % 50}": i, "shared": [i]}) for i in range(2000)]
    want = [json.loads(json.dumps(m.tool_calls)) for m in map(turnrl.parse_tool_calls, texts)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda t: turnrl.parse_tool_calls(t).tool_calls, texts))
    assert got == want


def test_exact_integers_survive_many_brackets_and_escapes() -> None:
    # Arguments that the parser checks a second time (many brackets, an
    # escape, an exponent) still keep integers beyond 64 bits exact.
    big = 123456789012345678901234567890
    for extra in ([{"a": [i]} for i in range(200)], "tab\there", 1e300):
        args = {"items": extra, "big": big}
        got = assert_matches_reference(call("f", args))
        assert got.tool_calls[0]["arguments"]["big"] == big
        assert type(got.tool_calls[0]["arguments"]["big"]) is int


def test_serde_json_raw_value_key_is_an_ordinary_key() -> None:
    # serde_json would read an object whose first key is this one as the JSON
    # in its string, so a call could hide inside a string; json.loads (and
    # the reference) keep it a key.
    key = "$serde_json::private::RawValue"
    hidden = json.dumps({key: json.dumps({"name": "f", "arguments": {}})})
    got = assert_matches_reference(f"<tool_call>{hidden}</tool_call>")
    assert not got.tool_calls and len(got.errors) == 1
    got = assert_matches_reference(call("f", {key: 1}) + call("g", {"x": {key: "[1,"}}))
    assert [c["arguments"] for c in got.tool_calls] == [{key: 1}, {"x": {key: "[1,"}}]
    xml = f'<function=book><parameter=meta>{{"{key}": "[1]"}}</parameter></function>'
    got = assert_matches_reference(xml, tools=TOOLS)
    assert got.tool_calls[0]["arguments"]["meta"] == {key: "[1]"}


def test_a_finished_thread_releases_its_cached_keys() -> None:
    import sys
    import threading

    text = call("f", {"key_only_this_test_uses": 1})
    seen: list[str] = []
    parsed, finish = threading.Event(), threading.Event()

    def work() -> None:
        seen.extend(turnrl.parse_tool_calls(text).tool_calls[0]["arguments"])
        parsed.set()
        finish.wait()

    thread = threading.Thread(target=work)
    thread.start()
    parsed.wait()
    (key,) = seen
    held_by_the_cache = sys.getrefcount(key)
    finish.set()
    thread.join()
    # `join` returns once Python is done with the thread; the thread's Rust
    # destructors, which hand the references over, may run a moment later.
    # Each call into the extension releases what has been handed over.
    deadline = time.monotonic() + 10
    while sys.getrefcount(key) != held_by_the_cache - 1 and time.monotonic() < deadline:
        time.sleep(0.005)
        turnrl.parse_tool_calls("")
    assert sys.getrefcount(key) == held_by_the_cache - 1


def test_reply_from_text_drops_an_empty_think_block_from_the_content() -> None:
    from turnrl.envs.agents import reply_from_text

    # Qwen3 with thinking off writes an empty block; its tags are not content.
    for text in [
        "<think>\n\n</think>\n\nYour flight is on time.",
        "<think></think>Your flight is on time.",
    ]:
        assert turnrl.parse_tool_calls(text).reasoning == ""
        reply = reply_from_text(text)
        assert reply["content"] == "Your flight is on time."
        assert reply["reasoning"] is None and reply["tool_calls"] == []
        assert reply["completion"] == text
    # No block at all: the raw text is the content, untrimmed.
    assert reply_from_text(" hi\n")["content"] == " hi\n"


def test_a_call_tag_named_in_reasoning_leaves_the_answer_alone() -> None:
    text = "Just thanks; no <tool_call> needed</think>You're welcome!"
    for fmt in ("auto", "hermes", "qwen3_coder"):
        got = turnrl.parse_tool_calls(text, fmt)
        assert got.reasoning == "Just thanks; no <tool_call> needed", fmt
        assert (got.content, got.tool_calls, got.errors) == ("You're welcome!", [], [])
        assert ref_parse(text, fmt)["reasoning"] == got.reasoning
    # A call cut off at the end that starts as one still hides its `</think>`.
    from turnrl.envs.users import split_reasoning

    for gap in ("\n", "\x0b", "\x0c", " \t\r"):  # what the parser trims from a call body
        cut = f'<tool_call>{gap}{{"name": "note", "arguments": {{"text": "a </think>'
        assert turnrl.parse_tool_calls(cut).reasoning is None, repr(gap)
        assert ref_parse(cut)["reasoning"] is None and split_reasoning(cut) == (None, cut)


def test_split_reasoning_ends_reasoning_where_the_parser_does() -> None:
    from turnrl.envs.users import split_reasoning

    call_text = '<tool_call>{"name": "x", "arguments": {"t": "a </think> <think> b"}}</tool_call>'
    leads = [
        "",
        "plan</think>",
        "<think>plan</think>",
        "<think>plan ",
        "I use <tool_call> tags</think>",
        "no <tool_call> needed</think>",
        "<think>no <tool_call>\n needed</think>",
    ]
    for lead in leads:
        for tail in [
            "",
            call_text,
            call_text + " ok",
            " so " + call_text[:-20],
            call_text + "</think>",
        ]:
            text = lead + tail
            reasoning, rest = split_reasoning(text)
            assert reasoning == turnrl.parse_tool_calls(text, "hermes").reasoning, text
            if reasoning is None:
                assert rest == text
    assert split_reasoning("a " + call_text + " b</think> c") == ("a " + call_text + " b", "c")
    assert split_reasoning(call_text) == (None, call_text)


def test_split_reasoning_takes_no_think_block_out_of_a_call() -> None:
    from turnrl.envs.users import split_reasoning

    # The parser reads a `<tool_call>` to its `</tool_call>`, the next
    # `<tool_call>` or the end of the text, whether or not it starts as a
    # call: a `<think>` in it is text of the call (an error), not a block.
    good = '<tool_call>{"name": "a"}</tool_call>'
    for text in [
        "no <tool_call> needed <think>hmm</think> bye",
        "<tool_call>x <think>y</think> z" + good,
        "<tool_call>oops <think>y",
    ]:
        want = turnrl.parse_tool_calls(text, "hermes").reasoning
        assert want is None, text
        assert split_reasoning(text) == (None, text), text
    # Reasoning is trimmed as the parser trims it: ASCII whitespace only.
    text = "<think>\u00a0plan\u2003</think>\u00a0answer"
    assert turnrl.parse_tool_calls(text, "hermes").reasoning == "\u00a0plan\u2003"
    assert split_reasoning(text) == ("\u00a0plan\u2003", "\u00a0answer")

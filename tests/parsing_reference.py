"""Plain Python reference of turnrl's tool-call parser, with the same rules
(see rust/core/src/parse.rs): str.find scans, json.loads, no regex.

Error offsets are byte offsets into the UTF-8 input, as in the Rust parser.
"""

from __future__ import annotations

import json
from typing import Any

WS = " \t\n\r\x0b\x0c"
ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
KNOWN_TYPES = {"integer", "number", "boolean", "object", "array", "null"}
# A union branch whose types are not known (a $ref): a JSON object or array
# there (a scalar stays a string: the $ref may be a string enum). Not a JSON
# Schema type name (those outside KNOWN_TYPES read as "string").
ANY = None
MISSING = object()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _int(literal: str) -> int | float:
    # serde_json reads the literal -0 as the float -0.0.
    return -0.0 if literal == "-0" else int(literal)


def loads(text: str) -> Any:
    """json.loads restricted to what serde_json accepts."""
    return json.loads(text, parse_constant=_reject_constant, parse_int=_int)


def find_first(text: str, start: int, end: int, tags: list[str]) -> tuple[int, int] | None:
    best: tuple[int, int] | None = None
    for i, tag in enumerate(tags):
        p = text.find(tag, start, end)
        if p >= 0 and (best is None or p < best[0]):
            best = (p, i)
    return best


def build_schemas(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, list[str]]] | None:
    if tools is None:
        return None
    out: dict[str, dict[str, list[str]]] = {}
    for tool in tools:
        fn = tool.get("function", tool)
        params = out.setdefault(fn["name"], {})
        props = (fn.get("parameters") or {}).get("properties") or {}
        for key, spec in props.items():
            names = _spec_types(spec) if isinstance(spec, dict) else []
            params[key] = list(
                dict.fromkeys(n if n in KNOWN_TYPES or n is ANY else "string" for n in names)
            )
    return out


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if value is None:
        return "null"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def _spec_types(spec: dict[str, Any], depth: int = 0) -> list[str | None]:
    """`type`, else the anyOf/oneOf branches' types (each branch read by
    these rules, ANY for one they say nothing of), else the enum/const kinds."""
    ty = spec.get("type")
    if ty is not None:
        return [ty] if isinstance(ty, str) else [t for t in ty if isinstance(t, str)]
    names: list[str | None] = []
    for union in ("anyOf", "oneOf"):
        for branch in spec.get(union) or []:
            known = (
                _spec_types(branch, depth + 1) if isinstance(branch, dict) and depth < 32 else []
            )
            names += known or [ANY]
    values = spec["enum"] if isinstance(spec.get("enum"), list) else []
    if not values and "const" in spec:
        values = [spec["const"]]
    return names + [_json_kind(v) for v in values]


def _nesting(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_nesting, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_nesting, value.values()), default=0)
    return 0


def json_literal(t: str) -> Any:
    if not t:
        return MISSING
    first = t[0]
    if not ("0" <= first <= "9" or first in '-{[tfn"'):
        return MISSING
    try:
        value = loads(t)
    except (ValueError, RecursionError):
        return MISSING
    # Written into the arguments object, the value must stay within
    # serde_json's 127 levels: at most 126 of its own.
    return value if _nesting(value) <= 126 else MISSING


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def type_value(value: str, types: list[str | None] | None) -> Any:
    t = value.strip(WS)
    if not types:
        v = json_literal(t)
        return value if v is MISSING or isinstance(v, str) else v
    if t == "null" and ("null" in types or "string" not in types):
        return None
    for ty in types:
        v = json_literal(t) if ty in ("integer", "number", "object", "array") else MISSING
        if ty == "string":
            return value
        if ty == "integer" and _is_int(v):
            return v
        if ty == "number" and (_is_int(v) or isinstance(v, float)):
            return v
        if ty == "boolean" and t in ("true", "True", "false", "False"):
            return t in ("true", "True")
        if ty == "object" and isinstance(v, dict):
            return v
        if ty == "array" and isinstance(v, list):
            return v
        if ty == "null" and t == "null":
            return None
        if ty is ANY:
            v = json_literal(t)
            if isinstance(v, (dict, list)):
                return v
    return value


class _Out:
    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, Any]]] = []
        self.errors: list[tuple[int, str]] = []


def strip_fence(body: str) -> str:
    if not body.startswith("```"):
        return body
    rest = body[3:].lstrip(ALNUM)
    if rest.endswith("```"):
        rest = rest[:-3]
    return rest.strip(WS)


def parse_json_call(body: str) -> tuple[str, dict[str, Any]]:
    try:
        call = loads(strip_fence(body))
    except ValueError as e:
        raise ValueError(f"invalid JSON: {e}") from None
    if not isinstance(call, dict):
        raise ValueError("not an object")
    name = call.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("bad name")
    args = call["arguments"] if "arguments" in call else call.get("parameters")
    if args is None:
        return name, {}
    if isinstance(args, dict):
        return name, args
    if isinstance(args, str):
        inner = args.strip(WS)
        if not inner:
            return name, {}
        try:
            decoded = loads(inner)
        except ValueError:
            raise ValueError("arguments string is not JSON") from None
        if isinstance(decoded, dict):
            return name, decoded
    raise ValueError("arguments is not an object")


def function_block(text: str, open_at: int, limit: int) -> tuple[int, bool, int]:
    """(inner_end, closed, next)."""
    hit = find_first(text, open_at + len("<function="), limit, ["</function>", "<function="])
    if hit is None:
        return limit, False, limit
    p, which = hit
    if which == 0:
        return p, True, p + len("</function>")
    return p, False, p


def parse_function_block(
    text: str, open_at: int, end: int, closed: bool, schemas: Any
) -> tuple[str, dict[str, Any]]:
    name_start = open_at + len("<function=")
    gt = text.find(">", name_start, end)
    if gt < 0:
        raise ValueError("unterminated function tag")
    name = text[name_start:gt].strip(WS)
    if not name:
        raise ValueError("empty function name")
    args: dict[str, Any] = {}
    at = gt + 1
    while True:
        hit = find_first(text, at, end, ["<parameter="])
        if hit is None:
            break
        key_start = hit[0] + len("<parameter=")
        gt = text.find(">", key_start, end)
        if gt < 0:
            raise ValueError("unterminated parameter tag")
        key = text[key_start:gt].strip(WS)
        if not key:
            raise ValueError("empty parameter name")
        vstart = gt + 1
        hit = find_first(text, vstart, end, ["</parameter>", "<parameter="])
        if hit is None:
            if not closed:
                raise ValueError("parameter cut off")
            vend, nxt = end, end
        elif hit[1] == 0:
            vend, nxt = hit[0], hit[0] + len("</parameter>")
        else:
            vend, nxt = hit[0], hit[0]
        value = text[vstart:vend]
        if value.startswith("\n"):
            value = value[1:]
        if value.endswith("\n"):
            value = value[:-1]
        types = None if schemas is None else schemas.get(name, {}).get(key)
        args[key] = type_value(value, types)
        at = nxt
    return name, args


def _xml_call(text: str, open_at: int, limit: int, schemas: Any, out: _Out, report_at: int) -> int:
    inner_end, closed, nxt = function_block(text, open_at, limit)
    try:
        name, args = parse_function_block(text, open_at, inner_end, closed, schemas)
        out.calls.append((report_at, {"name": name, "arguments": args}))
    except ValueError as e:
        out.errors.append((report_at, str(e)))
    return nxt


def _bare_xml_call(text: str, open_at: int, schemas: Any, out: _Out) -> int:
    """A `<function=` block outside `<tool_call>`: it must not run over a
    `<tool_call>`, nor, when `</function>` does not close it, over a
    `<think>`; it is then an error and ends at that tag."""
    start = open_at + len("<function=")
    hit = find_first(text, start, len(text), ["</function>", "<function=", "<tool_call>"])
    if hit is None or hit[1] != 0:
        end = len(text) if hit is None else hit[0]
        tag = hit if hit is not None and hit[1] == 2 else find_first(text, start, end, ["<think>"])
        if tag is not None:
            out.errors.append((open_at, "function block not closed"))
            return tag[0]
    return _xml_call(text, open_at, len(text), schemas, out, open_at)


def starts_like_a_call(body: str) -> bool:
    """A JSON object, a code fence or a `<function=` block (or nothing yet)."""
    body = body.lstrip(" \t\n\r\x0b\x0c")
    return not body or body.startswith(("{", "```", "<function="))


def _call_reach(text: str, at: int, tag: str) -> tuple[str, int]:
    """How far the call opening at `at` (a `<tool_call>` or a bare
    `<function=`) keeps reasoning tags as its text: ("closed", end of the
    call), ("cut", end of the text) or ("open", where the tag ended) when the
    call's closer was forgotten and its tags count."""
    n = len(text)
    if tag == "<tool_call>":
        hit = find_first(text, at + len(tag), n, ["</tool_call>", "<tool_call>"])
        if hit is None:
            # A call cut off at the end if it starts as one; else prose naming the tag.
            return ("cut" if starts_like_a_call(text[at + len(tag) :]) else "open"), n
        if hit[1] == 0:
            return "closed", hit[0] + len("</tool_call>")
        return "open", hit[0]
    start = at + len(tag)
    hit = find_first(text, start, n, ["</function>", "<function=", "<tool_call>"])
    if hit is not None and hit[1] == 0:
        return "closed", hit[0] + len("</function>")
    end = n if hit is None else hit[0]
    think = find_first(text, start, end, ["<think>"])
    if think is not None:
        return "open", think[0]
    if hit is None:
        return "cut", n
    return "open", end


def reasoning_end(text: str, start: int, fmt: str, leading: bool) -> tuple[int, int] | None:
    """The first `</think>` (0) from `start` outside calls, or with
    `leading` a `<think>` (1) before it; None when reasoning runs to the end."""
    think = ["</think>", "<think>"] if leading else ["</think>"]
    calls = ["<tool_call>"] + (["<function="] if fmt != "hermes" else [])
    pos = start
    while True:
        hit = find_first(text, pos, len(text), think + calls)
        if hit is None:
            return None
        at, which = hit
        if which < len(think):
            return at, which
        tag = calls[which - len(think)]
        how, end = _call_reach(text, at, tag)
        if how == "cut":
            return None
        if how == "open":
            inner = find_first(text, at + len(tag), end, think)
            if inner is not None:
                return inner
        pos = end


def parse_body(
    text: str, tag_at: int, start: int, end: int, fmt: str, schemas: Any, out: _Out
) -> None:
    raw = text[start:end]
    body = raw.strip(WS)
    if not body:
        out.errors.append((tag_at, "empty tool call"))
        return
    xml = fmt == "qwen3_coder" or (fmt == "auto" and body.startswith("<function="))
    if not xml:
        try:
            name, args = parse_json_call(body)
            out.calls.append((tag_at, {"name": name, "arguments": args}))
        except ValueError as e:
            out.errors.append((tag_at, str(e)))
        return
    if not body.startswith("<function="):
        out.errors.append((tag_at, "expected <function=NAME>"))
        return
    at = start + (len(raw) - len(raw.lstrip(WS)))
    first = True
    while at < end:
        nxt = _xml_call(text, at, end, schemas, out, tag_at if first else at)
        first = False
        hit = find_first(text, nxt, end, ["<function="])
        if hit is None:
            break
        at = hit[0]


def _byte_offset(text: str, i: int) -> int:
    return len(text[:i].encode("utf-8"))


def parse(
    text: str, fmt: str = "auto", tools: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The reference parse: dict with content, reasoning, tool_calls, error_offsets."""
    schemas = build_schemas(tools)
    out = _Out()
    content: list[str] = []
    reasoning: str | None = None
    pos = 0
    n = len(text)
    hit = reasoning_end(text, 0, fmt, True)
    if hit is not None and hit[1] == 0:
        reasoning = text[: hit[0]]
        pos = hit[0] + len("</think>")
    tags = ["<think>", "<tool_call>"] + (["<function="] if fmt != "hermes" else [])
    while True:
        hit = find_first(text, pos, n, tags)
        if hit is None:
            break
        at, which = hit
        content.append(text[pos:at])
        if which == 0:
            start = at + len("<think>")
            close = reasoning_end(text, start, fmt, False)
            end, nxt = (close[0], close[0] + len("</think>")) if close else (n, n)
            if reasoning is None:
                reasoning = ""
            if reasoning:
                reasoning += "\n"
            reasoning += text[start:end]
            pos = nxt
        elif which == 1:
            start = at + len("<tool_call>")
            close = find_first(text, start, n, ["</tool_call>", "<tool_call>"])
            if close is None:
                end, nxt = n, n
            elif close[1] == 0:
                end, nxt = close[0], close[0] + len("</tool_call>")
            else:
                end, nxt = close[0], close[0]
            parse_body(text, at, start, end, fmt, schemas, out)
            pos = nxt
        else:
            pos = _bare_xml_call(text, at, schemas, out)
    content.append(text[pos:])
    return {
        "content": "".join(content).strip(WS),
        "reasoning": None if reasoning is None else reasoning.strip(WS),
        "tool_calls": [c for _, c in out.calls],
        "error_offsets": [_byte_offset(text, i) for i, _ in out.errors],
        "call_offsets": [_byte_offset(text, i) for i, _ in out.calls],
    }

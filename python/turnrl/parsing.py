"""Reading tool calls out of assistant messages (Rust core).

Two formats are understood: Hermes/Qwen JSON inside ``<tool_call>`` tags and
Qwen3-Coder XML (``<function=NAME><parameter=KEY>value</parameter></function>``,
with or without the outer ``<tool_call>`` tags). ``fmt="auto"`` decides per
call. Real model output is messy, so the parser keeps going: a malformed call
becomes one entry of ``.errors`` (with the byte offset of its opening tag in
``.error_offsets``) and every other call is still returned.

Rules, in short (the full list is in ``rust/core/src/parse.rs``):

* ``<think>...</think>`` is reasoning (a block never closed runs to the end;
  a ``</think>`` with no ``<think>`` before it ends reasoning that began in
  the prompt). Tags inside reasoning are text: a call there is not a call.
  Reasoning ends at the first ``</think>`` outside calls: one inside a
  ``<tool_call>`` that ``</tool_call>`` closes, inside a call cut off at the
  end of the text that starts as one (a JSON object, a code fence or a
  ``<function=`` block: "no ``<tool_call>`` needed``</think>``" is prose
  naming the tag), or (XML formats) inside a bare ``<function=`` block that
  ``</function>`` closes or that is cut off, is text of that call. So a call
  with ``</think>`` in its arguments is still a call, and one written in
  reasoning before its ``</think>`` is still reasoning. A ``<tool_call>``
  that a later ``<tool_call>`` ends (a forgotten closer, or prose naming the
  tag) does not hide a ``</think>`` in it.
* A ``<tool_call>`` never closed (generation cut off) ends at the next
  ``<tool_call>`` or the end of the text; it still parses when its JSON is
  complete.
* A bare ``<function=NAME>`` block (no ``<tool_call>`` around it) never
  closed ends at the next ``<function=`` or the end of the text and is read
  like a closed one (an XML value it cuts off is an error). But no call runs
  over a ``<tool_call>``, nor an unclosed block over a ``<think>``: such a
  block ends at that tag and is an error (prose naming the tag, or a
  forgotten ``</function>``), and the call or reasoning after it is read as
  usual.
* JSON bodies may sit in a code fence; ``arguments`` (alias ``parameters``)
  may be an object, a JSON-encoded string, or missing / null / blank (``{}``);
  other keys are ignored; ``name`` must be a non-empty string.
* XML values are typed from the tool's JSON schema when ``tools`` is given
  (a parameter's ``type``, else the types of its ``anyOf``/``oneOf``
  branches, else the kinds of its ``enum``/``const`` values; a branch that
  names no type, such as a ``$ref``, allows a JSON object or array there);
  without one,
  a value that reads as a JSON number, boolean, null, object or
  array takes that type and anything else stays a string. JSON nested more
  than 126 levels deep stays a string (inside the arguments it would pass
  the JSON reader's limit of 127).
* ``.content`` is the text outside reasoning and calls, trimmed of ASCII
  whitespace.
* JSON numbers keep their type: integers are ints, exact at any size (as
  ``json.loads`` reads them), and everything else is a float (``-0`` reads
  as ``-0.0``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from turnrl import _core
from turnrl._core import ParsedMessage

__all__ = ["ParsedMessage", "ToolCallFormat", "parse_tool_calls", "parse_tool_calls_batch"]

ToolCallFormat = Literal["auto", "hermes", "qwen3_coder"]
"""Accepted values of ``fmt``."""


def _json_int(literal: str) -> int | float:
    # The Rust side reads the literal -0 as the float -0.0 (serde_json does).
    return -0.0 if literal == "-0" else int(literal)


def _loads_exact(text: str) -> Any:
    """Arguments holding an integer beyond 64 bits, decoded with exact ints.

    Called by the extension for the rare JSON text whose integers its own
    decoder would turn into floats; the text has been checked already.
    """
    return json.loads(text, parse_int=_json_int)


def parse_tool_calls(
    text: str,
    fmt: ToolCallFormat = "auto",
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> ParsedMessage:
    """Splits one assistant message into content, reasoning, tool calls and errors.

    Args:
        text: the generated assistant text.
        fmt: ``"auto"``, ``"hermes"`` or ``"qwen3_coder"``.
        tools: OpenAI function schemas (``{"type": "function", "function":
            {...}}`` or the inner dict); they type Qwen3-Coder parameter values.

    Returns:
        A frozen :class:`ParsedMessage` with ``content`` (str), ``reasoning``
        (str or None), ``tool_calls`` (list of ``{"name", "arguments"}``),
        ``errors`` (list of str), ``error_offsets`` and ``call_offsets``
        (byte offsets of the failed and of the parsed calls' opening tags,
        which together give the order the message wrote its calls in).

    Raises:
        UnknownNameError: for an unknown ``fmt``.
        InvalidInputError: for a malformed ``tools`` list.
    """
    return _core.parse_tool_calls(text, fmt, tools)


def parse_tool_calls_batch(
    texts: Sequence[str],
    fmt: ToolCallFormat = "auto",
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[ParsedMessage]:
    """Parses many messages in parallel (Rust threads, GIL released).

    Gives the same results as ``[parse_tool_calls(t, fmt, tools) for t in texts]``.
    """
    return _core.parse_tool_calls_batch(list(texts), fmt, tools)

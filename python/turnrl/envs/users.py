"""Simulated users: a deterministic scripted one and an LLM one.

A user has ``reset(task) -> str`` (the opening message) and
``step(agent_message) -> str`` (the reply). A reply containing ``###STOP###``
ends the episode.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol, TypeVar

from turnrl.envs._base import AGENT_GREETING, STOP_TOKEN, Task
from turnrl.exceptions import InvalidInputError, TurnrlError

_T = TypeVar("_T")

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "STOP_TOKEN",
    "TAU2_SYSTEM_PROMPT",
    "TAU2_USER_GUIDELINES",
    "ChatEndpoint",
    "LLMUser",
    "ScriptedUser",
    "User",
    "UserSimulatorError",
    "tau2_user_system_prompt",
]


class UserSimulatorError(TurnrlError, RuntimeError):
    """The user simulator's model could not be reached or kept failing."""


class User(Protocol):
    """What the episode runner needs from a simulated user."""

    def reset(self, task: Task) -> str:
        """Start a conversation on ``task``; return the user's first message."""
        ...

    def step(self, agent_message: str) -> str:
        """Reply to the agent's message."""
        ...


_CONFIRM = re.compile(
    r"\b(confirm|proceed|go ahead|shall i|should i|would you like|do you want|yes/no|"
    r"is that correct|is this correct|okay to)\b",
    re.IGNORECASE,
)
_ASKS_ID = re.compile(r"\buser[ _]?id\b", re.IGNORECASE)


class ScriptedUser:
    """A deterministic user that answers from the task's facts.

    It opens with the first of ``task.facts["user_lines"]`` (or a line built
    from the user id), then says the remaining lines in order, one per agent
    message. After that it answers a confirmation question with "Yes", a
    question for the user id with the id, and otherwise ends with
    ``###STOP###``. ``max_replies`` bounds the conversation.
    """

    def __init__(self, max_replies: int = 12) -> None:
        self.max_replies = max_replies
        self._lines: list[str] = []
        self._task: Task | None = None
        self._replies = 0

    def reset(self, task: Task) -> str:
        self._task = task
        self._replies = 0
        lines = list(task.facts.get("user_lines") or [])
        if not lines:
            lines = [f"Hi, I need help with my booking. My user id is {task.user_id}."]
        self._lines = lines[1:]
        return lines[0]

    def step(self, agent_message: str) -> str:
        if self._task is None:
            raise InvalidInputError("ScriptedUser.step called before reset")
        self._replies += 1
        if self._replies > self.max_replies:
            return STOP_TOKEN
        if self._lines:
            return self._lines.pop(0)
        text = agent_message or ""
        if _CONFIRM.search(text):
            return "Yes, please go ahead."
        if _ASKS_ID.search(text):
            return f"My user id is {self._task.user_id}."
        return STOP_TOKEN


# tau-bench's layout: one line saying who the model plays, a blank line,
# "Instruction: ..." on its own, a blank line, then "Rules:" with one rule a
# line. The rules are tau-bench's six, in its order, in turnrl's words.
DEFAULT_SYSTEM_PROMPT = """You are playing a customer who talks with a customer service agent.

Instruction: {instruction}

Rules:
- Write one line at a time, as the customer's next message.
- Reveal the instruction bit by bit; give only what the current step needs.
- Never invent facts the instruction does not give. If the agent asks for something \
you were not told (an order id, a date), say you don't remember or don't have it.
- When the instruction's goal is met, reply with '###STOP###' alone to end the chat.
- Don't recite the instruction; say things in your own words.
- Keep the conversation natural and true to the personality in the instruction."""

#: tau2-bench's global user simulation guidelines (its
#: ``data/tau2/user_simulator/simulation_guidelines.md``) in turnrl's words:
#: the same rules in the same sections and order, the same three tokens
#: (tau2 domains end an episode on any of them, :class:`turnrl.envs.EpisodeRules`).
#: What a tau2 domain shows the user when its checkout lacks that file (a
#: data-only copy). It ends with a newline, as the file does.
TAU2_USER_GUIDELINES = """# Playing the customer
You are the customer in a chat with a customer service representative.
Act as a real customer would, within the scenario you are given.

## Rules
- Send one message per turn, as in an ordinary conversation.
- Do what your scenario's instructions say, and nothing beyond them.
- You know only what the scenario tells you: anything it leaves out, you do not \
know or do not have. Never invent it.
- Put the instructions in your own words instead of quoting them.
- Hand over details a piece at a time, only once the agent asks for them.

## When to stop
- Carry on until the task is finished.
- Once your instructions' goal is reached, send '###STOP###' to end the chat.
- If you are handed over to another agent, send '###TRANSFER###'.
- If the scenario leaves you without what you need to carry on, send \
'###OUT-OF-SCOPE###' to end the chat.
Throughout: stay in character, keep the chat realistic, and keep strictly to your \
instructions.
"""


def tau2_user_system_prompt(guidelines: str, scenario: str) -> str:
    """The system message tau2-bench's user simulator is shown: the
    ``guidelines`` text as it is, a blank line, then ``scenario`` (the
    task's rendered ``user_scenario``) between ``<scenario>`` lines."""
    return f"{guidelines}\n\n<scenario>\n{scenario}\n</scenario>"


#: An :class:`LLMUser` template in tau2-bench's layout, with
#: :data:`TAU2_USER_GUIDELINES`. A task without a ``user_system_prompt``
#: (one made by hand) is shown :data:`DEFAULT_SYSTEM_PROMPT`, which teaches
#: ``###STOP###`` alone: give this as ``system_prompt=`` to show such tau2
#: tasks tau2's layout and endings.
TAU2_SYSTEM_PROMPT = tau2_user_system_prompt(TAU2_USER_GUIDELINES, "{instruction}")

# What the simulated user hears first, as in both benchmarks.
OPENING = AGENT_GREETING

#: The longest wait a ``Retry-After`` header gets from :class:`ChatEndpoint`,
#: in seconds: a server asking for an hour is not waited on for an hour.
MAX_RETRY_AFTER = 60.0


class ChatEndpoint:
    """A chat model behind an OpenAI-compatible endpoint, with retries.

    ``base_url`` and ``api_key`` default to ``OPENAI_BASE_URL`` and the
    environment variable named by ``api_key_env``. Transient failures
    (connection, timeout, rate limit, 5xx, 408 and 409, and an answer that is
    not a chat completion: cut-off JSON, a proxy's HTML page, a choice without
    a message or with one that is not an assistant message) are retried
    ``max_retries`` times with exponential backoff; then ``error`` (an
    exception type) says which endpoint failed, as ``what`` (for example
    "user simulator"). A 429 or 503 answer's ``Retry-After`` header (seconds
    or an HTTP date) lengthens the wait before the next try to what it asks,
    up to :data:`MAX_RETRY_AFTER` seconds; the wait is never shorter than
    the backoff's. ``openai`` is imported only when an endpoint is created.
    A ``temperature`` that is not a finite number, 0 or more, or retry
    options out of range are an :class:`InvalidInputError` when it is made.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        timeout: float = 60.0,
        extra_body: dict[str, Any] | None = None,
        what: str = "chat model",
        error: type[Exception] = RuntimeError,
    ) -> None:
        temperature = _check_temperature(temperature)
        _check_retry_options(max_retries, backoff, timeout)
        try:
            import openai
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError(
                f"the {what} needs the openai package: pip install 'turnrl[training]'"
            ) from e
        self._openai = openai
        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        key = api_key or os.environ.get(api_key_env) or "EMPTY"
        self.temperature = temperature
        self.max_retries = max_retries
        self.backoff = backoff
        self.extra_body = extra_body
        self.what = what
        self.error = error
        # Retries are ours (with our backoff and error text), not the client's.
        self.client = openai.OpenAI(
            base_url=self.base_url, api_key=key, max_retries=0, timeout=timeout
        )

    @property
    def where(self) -> str:
        """Which endpoint this is, for error messages."""
        return f"{self.what} at {self.client.base_url} (model {self.model})"

    def complete(self, messages: Sequence[dict[str, str]]) -> str:
        """The model's reply to ``messages`` (its text; empty if it gave none)."""
        return self.respond(messages).content or ""

    def respond(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> Any:
        """The model's whole reply message (``openai``'s object: ``content``,
        ``tool_calls``, ...) to ``messages``; ``params`` go to the request
        (``tools``, ``max_tokens``, ...)."""
        return self.respond_finished(messages, **params)[0]

    def respond_finished(
        self, messages: Sequence[Mapping[str, Any]], **params: Any
    ) -> tuple[Any, str | None]:
        """:meth:`respond`'s message and why the generation ended: the choice's
        ``finish_reason`` (``"length"`` when cut at ``max_tokens``; None when
        the server gives none)."""
        return self.request(
            lambda: _first_choice(
                self.client.chat.completions.create(
                    model=self.model,
                    messages=list(messages),  # type: ignore[arg-type]
                    temperature=self.temperature,
                    extra_body=self.extra_body,
                    **params,
                )
            )
        )

    def request(self, send: Callable[[], _T], answer: str = "chat completion") -> _T:
        """``send()`` (a request through :attr:`client` that returns what it
        read from the answer, raising :class:`MalformedAnswer` for an answer
        that is not the ``answer`` asked for), retried as the class says."""
        oa = self._openai
        transient = (
            oa.APIConnectionError,
            oa.APITimeoutError,
            oa.RateLimitError,
            oa.InternalServerError,
        )
        where = self.where
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                return send()
            except oa.APIStatusError as e:
                # 408 and 409 are worth another try (as the openai client's own
                # retries judge); any other status is the request's fault.
                if isinstance(e, transient) or e.status_code in (408, 409):
                    last = e
                else:
                    raise self.error(f"{where} answered HTTP {e.status_code}: {e.message}") from e
            except (*transient, MalformedAnswer, json.JSONDecodeError) as e:
                # JSONDecodeError: a body cut off mid-JSON. (Other ValueErrors,
                # a key that is not ASCII for one, come before any request.)
                last = e
            if attempt < self.max_retries:
                wait = self.backoff * 2**attempt
                asked = _retry_after(last)
                if asked is not None:
                    wait = max(wait, min(asked, MAX_RETRY_AFTER))
                time.sleep(wait)
        failed = (
            f"answered no {answer}"
            if isinstance(last, (MalformedAnswer, json.JSONDecodeError))
            else "unreachable"
        )
        raise self.error(
            f"{where} {failed} after {self.max_retries + 1} attempts: {type(last).__name__}: {last}"
        ) from last


def _retry_after(error: Exception | None) -> float | None:
    """The seconds a 429 or 503 answer's ``Retry-After`` header asks a client
    to wait (a number of seconds, inf when too long for a float, or an HTTP
    date, 0 when past); None for another answer or a header that is missing
    or reads as neither."""
    if getattr(error, "status_code", None) not in (429, 503):
        return None
    headers = getattr(getattr(error, "response", None), "headers", None)
    value = headers.get("retry-after") if headers is not None else None
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP date is GMT
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    # A count too long for a float reads as inf: the longest wait, which the
    # caller caps, not none at all.
    return None if math.isnan(seconds) else max(0.0, seconds)


def _check_temperature(temperature: Any) -> float:
    """``temperature`` as a float, or :class:`InvalidInputError`: a finite number,
    0 or more (0: greedy). NaN compares as neither above nor below 0, so it
    would slip past a plain ``< 0`` check and sample greedily, or fail every
    request to a server."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature >= 0)
    ):
        raise InvalidInputError(
            f"temperature must be a finite number, 0 or more (0: greedy), got {temperature!r}"
        )
    return float(temperature)


def _check_retry_options(max_retries: Any, backoff: Any, timeout: Any) -> None:
    """:class:`InvalidInputError` naming the option unless ``max_retries`` is an
    integer, 0 or more, ``backoff`` a finite number of seconds, 0 or more, and
    ``timeout`` a finite number of seconds above 0 (or None: no timeout). A
    negative ``max_retries`` would send nothing and call the endpoint unreachable;
    a negative ``backoff`` would fail in ``time.sleep`` after the first failure."""

    def number(value: Any) -> bool:
        return (
            not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        )

    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise InvalidInputError(f"max_retries must be an integer, 0 or more, got {max_retries!r}")
    if not (number(backoff) and backoff >= 0):
        raise InvalidInputError(
            f"backoff must be a finite number of seconds, 0 or more, got {backoff!r}"
        )
    if timeout is not None and not (number(timeout) and timeout > 0):
        raise InvalidInputError(
            f"timeout must be a finite number of seconds above 0, or None, got {timeout!r}"
        )


class MalformedAnswer(Exception):
    """A 200 answer that is not a chat completion (or not what was asked for)."""


def _first_choice(res: Any) -> tuple[Any, str | None]:
    """The first choice's message of a chat completion and its ``finish_reason``,
    or :class:`MalformedAnswer`."""
    choices = getattr(res, "choices", None)
    error = getattr(res, "error", None)  # {"error": ...} with status 200, as some proxies send
    if not choices and error:
        raise MalformedAnswer(f"an error instead of a completion: {error}")
    if not isinstance(choices, list):
        shown = res if isinstance(res, str) else type(res).__name__
        raise MalformedAnswer(f"not a chat completion: {str(shown)[:200]!r}")
    if not choices:
        raise MalformedAnswer("a chat completion with no choices")
    message = getattr(choices[0], "message", None)
    if message is None:
        raise MalformedAnswer("a choice without a message")
    _check_message(message)
    finish = getattr(choices[0], "finish_reason", None)
    return message, finish if isinstance(finish, str) else None


def _check_message(message: Any) -> None:
    """:class:`MalformedAnswer` unless ``message`` reads as an assistant message:
    text or null content, and tool calls (if any) a list of calls with a function.
    The openai client does not check what it reads, and the agent and the users
    would otherwise fail on such a message with an error that names no endpoint."""
    if not hasattr(message, "content"):
        raise MalformedAnswer(f"a choice whose message is not a message: {str(message)[:200]!r}")
    content = message.content
    if content is not None and not isinstance(content, str):
        raise MalformedAnswer(f"a message whose content is not text: {str(content)[:200]!r}")
    calls = getattr(message, "tool_calls", None)
    if calls is None:
        return
    if not isinstance(calls, list) or not all(
        getattr(call, "function", None) is not None and hasattr(call.function, "name")
        for call in calls
    ):
        raise MalformedAnswer(
            f"a message whose tool_calls are not calls with a function: {str(calls)[:200]!r}"
        )


_WS = " \t\n\r\x0b\x0c"  # what turnrl.parse_tool_calls trims: ASCII whitespace


def _call_end(text: str, at: int) -> tuple[int, bool]:
    """Where the ``<tool_call>`` at ``at`` ends as :func:`turnrl.parse_tool_calls`
    reads calls (after its ``</tool_call>``, at the next ``<tool_call>``, or
    at the end of the text), and whether it hides the reasoning tags in it:
    a closed call does, and one cut off at the end if it starts as a call
    (JSON, a code fence, ``<function=`` or nothing yet); one that the next
    ``<tool_call>`` ends (a forgotten closer, or prose naming the tag) and
    one cut off that starts as prose do not."""
    body = at + len("<tool_call>")
    close, reopen = text.find("</tool_call>", body), text.find("<tool_call>", body)
    if close >= 0 and (reopen < 0 or close < reopen):
        return close + len("</tool_call>"), True
    if reopen >= 0:
        return reopen, False
    rest = text[body:].lstrip(_WS)
    return len(text), not rest or rest.startswith(("{", "```", "<function="))


def _first(text: str, tags: tuple[str, ...], start: int, end: int) -> tuple[int, str] | None:
    found = [(at, tag) for tag in tags if 0 <= (at := text.find(tag, start, end))]
    return min(found) if found else None


def _think_tag(text: str, pos: int, tags: tuple[str, ...]) -> tuple[int, str] | None:
    """The first of ``tags`` at or after ``pos`` that lies in no call, as
    :func:`turnrl.parse_tool_calls` ends reasoning (see :func:`_call_end`)."""
    while True:
        hit = _first(text, (*tags, "<tool_call>"), pos, len(text))
        if hit is None or hit[1] != "<tool_call>":
            return hit
        end, hides = _call_end(text, hit[0])
        if not hides and (inner := _first(text, tags, hit[0] + len("<tool_call>"), end)):
            return inner
        pos = end


def _think_open(text: str) -> int | None:
    """Where the first ``<think>`` block opens outside calls, as the parser
    reads the text: every ``<tool_call>`` runs to where :func:`_call_end`
    says, and a ``<think>`` in it is text of the call."""
    pos = 0
    while (hit := _first(text, ("<think>", "<tool_call>"), pos, len(text))) is not None:
        if hit[1] == "<think>":
            return hit[0]
        pos = _call_end(text, hit[0])[0]
    return None


def split_reasoning(text: str) -> tuple[str | None, str]:
    """``(reasoning, rest)`` of a reply that thinks in ``<think>...</think>``,
    by the rules of :func:`turnrl.parse_tool_calls` (``fmt="hermes"``): a
    ``</think>`` with no ``<think>`` before it closes reasoning opened in the
    prompt (everything before it); else the first ``<think>`` block is taken
    out of the text around it; an unclosed one (cut off by the token limit)
    runs to the end. Reasoning tags inside a ``<tool_call>`` are text of the
    call. Both parts are trimmed of ASCII whitespace, as the parser trims.
    ``(None, text)`` when there is no such block."""
    first = _think_tag(text, 0, ("<think>", "</think>"))
    if first is not None and first[1] == "</think>":
        close = first[0]
        return text[:close].strip(_WS), text[close + len("</think>") :].strip(_WS)
    start = _think_open(text)
    if start is None:
        return None, text
    last = _think_tag(text, start + len("<think>"), ("</think>",))
    if last is None:
        return text[start + len("<think>") :].strip(_WS), text[:start].strip(_WS)
    end = last[0]
    reasoning = text[start + len("<think>") : end]
    return reasoning.strip(_WS), (text[:start] + text[end + len("</think>") :]).strip(_WS)


class LLMUser:
    """A user simulated by a chat model behind any OpenAI-compatible endpoint.

    It is shown what the task's benchmark shows its own LLM user simulator:

    * the system message: for a tau2-bench task, the task's
      ``user_system_prompt`` (tau2's user simulation guidelines, then the
      task's scenario between ``<scenario>`` lines; see
      :func:`turnrl.envs.load`); for a tau-bench task (and any task without
      one), :data:`DEFAULT_SYSTEM_PROMPT` with the task's instruction, in
      tau-bench's layout (who it plays, ``Instruction: ...``, ``Rules:``);
    * then the agent's greeting, "Hi! How can I help you today?", as a
      "user" message, which its first reply answers, and after that each
      agent message it is sent as a "user" message, its own replies as
      "assistant" messages. :func:`turnrl.envs.run_episode` sends it the
      text of agent messages without tool calls only, as both benchmarks do.

    ``###STOP###`` in a reply ends the episode (tau2 domains also end on
    ``###TRANSFER###`` and ``###OUT-OF-SCOPE###``, which tau2's guidelines
    teach). A thinking model's ``<think>`` reasoning is cut from its replies:
    the agent gets the rest, and the user's own history keeps the rest only.

    A ``system_prompt`` of your own replaces the benchmark's for every task:
    it must hold ``{instruction}``, where the task's instruction goes (for
    a tau2 task, its rendered scenario); nothing else in it is a placeholder
    (braces of JSON in it, ``{{`` included, stay as written: it is not
    ``str.format``). :data:`TAU2_SYSTEM_PROMPT` is tau2's layout with
    turnrl's wording of its guidelines.
    ``base_url`` and ``api_key`` default to ``OPENAI_BASE_URL`` and the
    environment variable named by ``api_key_env`` (``OPENAI_API_KEY``).
    Transient failures (connection, timeout, rate limit, 5xx) are retried
    ``max_retries`` times with exponential backoff; then
    :class:`UserSimulatorError` says which endpoint failed. ``openai`` is
    imported only when the user is created (``pip install turnrl[training]``).
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        timeout: float = 60.0,
        system_prompt: str | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.endpoint = ChatEndpoint(
            model,
            base_url,
            api_key,
            api_key_env=api_key_env,
            temperature=temperature,
            max_retries=max_retries,
            backoff=backoff,
            timeout=timeout,
            extra_body=extra_body,
            what="user simulator",
            error=UserSimulatorError,
        )
        if system_prompt is not None:
            _fill_instruction(system_prompt, "")  # refused now, not at the first episode
        self.model = model
        self.base_url = self.endpoint.base_url
        #: The template of one's own, or None: the benchmark's prompt per task.
        self.system_prompt = system_prompt
        self.client = self.endpoint.client
        self.messages: list[dict[str, str]] = []

    def system_message(self, task: Task) -> str:
        """The system message this user is shown for ``task`` (see the class)."""
        if self.system_prompt is not None:
            return _fill_instruction(self.system_prompt, task.instruction)
        if task.user_system_prompt is not None:
            return task.user_system_prompt
        return _fill_instruction(DEFAULT_SYSTEM_PROMPT, task.instruction)

    def reset(self, task: Task) -> str:
        self.messages = [
            {"role": "system", "content": self.system_message(task)},
            {"role": "user", "content": OPENING},
        ]
        return self._reply()

    def step(self, agent_message: str) -> str:
        self.messages.append({"role": "user", "content": agent_message or ""})
        return self._reply()

    def _reply(self) -> str:
        # A thinking model's reasoning is its own: the agent gets the rest,
        # and a stop marker it only thought about does not end the episode.
        _, text = split_reasoning(self.endpoint.complete(self.messages))
        self.messages.append({"role": "assistant", "content": text})
        return text


_INSTRUCTION_FIELD = "{instruction}"


def _fill_instruction(template: Any, instruction: str) -> str:
    """``template`` (an :class:`LLMUser` system prompt) with the task's
    instruction in place of every ``{instruction}``, the rest as written, or
    an :class:`InvalidInputError` saying what is wrong with it."""
    if not isinstance(template, str):
        raise InvalidInputError(
            f"LLMUser system_prompt must be text, got {type(template).__name__}"
        )
    if _INSTRUCTION_FIELD not in template:
        raise InvalidInputError(
            "LLMUser system_prompt has no {instruction}, where the task's instruction "
            "goes: the simulated user would not know what it wants"
        )
    return template.replace(_INSTRUCTION_FIELD, instruction)

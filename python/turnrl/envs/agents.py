"""A policy served behind an OpenAI-compatible endpoint, as a ``run_episode`` agent.

``vllm serve MODEL`` (or SGLang, or a hosted API) puts a policy behind
``/v1/chat/completions``; :class:`OpenAIAgent` sends it the chat and the
domain's tool schemas and hands the reply to :func:`turnrl.envs.run_episode`.
Servers started with a tool-call parser (vLLM's ``--enable-auto-tool-choice
--tool-call-parser hermes``) return structured ``tool_calls``; servers
without one return the calls as text, which is parsed here with
:func:`turnrl.parse_tool_calls` (Hermes/Qwen ``<tool_call>`` JSON and
Qwen3-Coder XML). A call that does not parse becomes an error observation
for the agent, naming the problem; the calls around it still run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from turnrl.envs.users import ChatEndpoint, _check_temperature, split_reasoning
from turnrl.exceptions import InvalidInputError, TurnrlError

__all__ = ["AgentError", "ContextLengthExceeded", "OpenAIAgent", "reply_from_text"]


class AgentError(TurnrlError, RuntimeError):
    """The policy's endpoint could not be reached or answered an error."""


class ContextLengthExceeded(AgentError):
    """The chat leaves the policy no room for a reply in its context.

    Multi-turn episodes grow; once a prompt fills the model's context
    (vLLM's ``--max-model-len``), no reply can be sampled after it.
    :func:`turnrl.envs.run_episode` ends the episode there (``stop_reason``
    ``"context_length"``) instead of failing it. ``prompt_tokens`` and
    ``limit`` are the prompt's length and the context's, when known (a
    served policy's refusal says them only in its message).
    """

    def __init__(
        self, message: str, *, prompt_tokens: int | None = None, limit: int | None = None
    ) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.limit = limit

    @classmethod
    def no_room(cls, prompt_tokens: int, limit: int) -> ContextLengthExceeded:
        """The error for a prompt of ``prompt_tokens`` tokens in a context of ``limit``."""
        return cls(
            f"the prompt has {prompt_tokens} tokens and the model's context holds {limit} "
            "(its max_model_len): no room for a reply",
            prompt_tokens=prompt_tokens,
            limit=limit,
        )


# How servers word a refusal for a prompt (plus max_tokens) longer than the
# context, all HTTP 400: OpenAI and SGLang, and vLLM from its first servers on
# ("This model's maximum context length is N tokens. However, you requested
# ..."), vLLM's renderer ("... However, the model's context length is only N
# tokens ...", vllm/renderers/params.py) and its engine's input check ("The
# decoder prompt (length N) is longer than the maximum model length of M",
# vllm/v1/engine/input_processor.py). OpenAI also gives the code
# "context_length_exceeded".
_CONTEXT_REFUSAL = re.compile(
    r"maximum context length|context length is only|longer than the maximum model length",
    re.IGNORECASE,
)


# The context and the reply's share in those wordings: a max_tokens that the
# whole context could not hold is a setting to fix, not an episode that grew.
_CONTEXT_SIZE = re.compile(
    r"(?:maximum context length is|context length is only) (\d+) tokens", re.IGNORECASE
)
_REPLY_SIZE = re.compile(r"(\d+) in the completion|requested (\d+) output tokens", re.IGNORECASE)


def _check_top_p(top_p: Any) -> float:
    """``top_p`` as a float, or :class:`InvalidInputError`: nucleus sampling keeps
    a share in (0, 1] of the probability mass."""
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InvalidInputError(f"top_p must be a number in (0, 1], got {top_p!r}")
    return float(top_p)


def _check_top_k(top_k: Any) -> int:
    """``top_k``, or :class:`InvalidInputError`: how many of the likeliest tokens
    sampling keeps, 0 for all (off); -1, vLLM's off, is taken as 0."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
        raise InvalidInputError(
            f"top_k must be a positive integer, or 0, -1 or None for off, got {top_k!r}"
        )
    return max(top_k, 0)


def _check_min_p(min_p: Any) -> float:
    """``min_p`` as a float, or :class:`InvalidInputError`: sampling keeps the
    tokens at least ``min_p`` times as likely as the likeliest, 0 for all (off)."""
    if isinstance(min_p, bool) or not isinstance(min_p, (int, float)) or not 0 <= min_p <= 1:
        raise InvalidInputError(f"min_p must be a number in [0, 1] (0: off), got {min_p!r}")
    return float(min_p)


def _check_repetition_penalty(penalty: Any) -> float:
    """``repetition_penalty`` as a float, or :class:`InvalidInputError`: the
    factor dividing (multiplying, if negative) the logits of the tokens already
    in the prompt or the reply, finite and above 0, 1 for none (off)."""
    if (
        isinstance(penalty, bool)
        or not isinstance(penalty, (int, float))
        or not (math.isfinite(penalty) and penalty > 0)
    ):
        raise InvalidInputError(
            f"repetition_penalty must be a finite number above 0 (1: off), got {penalty!r}"
        )
    return float(penalty)


def _is_context_refusal(error: BaseException | None) -> bool:
    """Whether ``error`` (an ``openai.APIStatusError``) is a server's refusal of
    a prompt that leaves no room in the model's context. A refusal of a
    ``max_tokens`` as large as the whole context, which every chat would get,
    is not: it stays an error that names the setting."""
    if getattr(error, "status_code", None) != 400:
        return False
    if getattr(error, "code", None) == "context_length_exceeded":
        return True
    message = getattr(error, "message", None)
    text = message if isinstance(message, str) else str(error)
    if not _CONTEXT_REFUSAL.search(text):
        return False
    context, reply = _CONTEXT_SIZE.search(text), _REPLY_SIZE.search(text)
    if context and reply:
        asked = int(reply.group(1) or reply.group(2))
        return asked < int(context.group(1))
    return True


class OpenAIAgent:
    """A ``run_episode`` agent asking a chat model behind an OpenAI-compatible endpoint.

    It keeps no conversation (``run_episode`` sends the whole chat each
    turn), so one agent can serve concurrent episodes.

    Endpoint options as :class:`turnrl.envs.LLMUser`'s (retries with
    backoff, then :class:`AgentError` naming the endpoint). ``max_tokens``
    caps each reply; ``parse_text_calls`` parses tool calls the server left
    in the text (``fmt`` as :func:`turnrl.parse_tool_calls`). The reply's
    reasoning (``reasoning``, or ``reasoning_content`` in older servers, from
    a server's reasoning parser, or ``<think>`` text, taken out of
    ``content`` whether or not the server parsed the calls) is returned as
    ``reasoning``:
    ``run_episode`` keeps it in the turn's record and sends it to no one.
    A reply the server cut at ``max_tokens`` (``finish_reason`` "length") is
    marked ``truncated``, so that training adds no end token it never sampled.
    The server's refusal of a chat that no longer fits the model's context
    (HTTP 400, "maximum context length", as vLLM and OpenAI word it) raises
    :class:`ContextLengthExceeded`, without retrying: ``run_episode`` ends
    the episode there. vLLM refuses a prompt that leaves fewer than
    ``max_tokens`` tokens of room; with ``max_tokens`` None it caps the
    reply at the room left instead.

    ``top_p``, ``top_k``, ``min_p`` and ``repetition_penalty`` (None: not
    sent, so the server's defaults apply, which for vLLM are the model's
    generation config's) are sent with each request; all but ``top_p`` in the
    body beside the OpenAI parameters, as vLLM and SGLang take them, ``top_k``
    0 (off) as -1, which every vLLM takes for off. Given at their off values
    (``min_p`` 0, ``repetition_penalty`` 1), they are sent, over the server's.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 1.0,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        max_tokens: int | None = None,
        max_retries: int = 4,
        backoff: float = 1.0,
        timeout: float = 300.0,
        parse_text_calls: bool = True,
        fmt: str = "auto",
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        temperature = _check_temperature(temperature)
        if top_p is not None:
            _check_top_p(top_p)
        # Beside the OpenAI parameters (the openai client has no argument for them).
        sampling: dict[str, Any] = {}
        if top_k is not None:
            sampling["top_k"] = _check_top_k(top_k) or -1
        if min_p is not None:
            sampling["min_p"] = _check_min_p(min_p)
        if repetition_penalty is not None:
            sampling["repetition_penalty"] = _check_repetition_penalty(repetition_penalty)
        if sampling:
            extra_body = {**(extra_body or {}), **sampling}
        self.top_p = top_p
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
            what="agent policy",
            error=AgentError,
        )
        self.max_tokens = max_tokens
        self.parse_text_calls = parse_text_calls
        self.fmt = fmt

    def __call__(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        """The assistant's next message: ``content``, ``tool_calls``, ``reasoning``."""
        params: dict[str, Any] = {}
        if tools:
            params["tools"] = list(tools)
        if self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        if self.top_p is not None:
            params["top_p"] = self.top_p
        try:
            reply, finish = self.endpoint.respond_finished(messages, **params)
        except AgentError as e:
            # The endpoint raised its AgentError from the openai client's error.
            if _is_context_refusal(e.__cause__):
                raise ContextLengthExceeded(str(e)) from e.__cause__
            raise
        cut = finish == "length"
        content = reply.content or ""
        # A reasoning parser's output: "reasoning" in current vLLM (which
        # renamed and then dropped "reasoning_content"), the old name elsewhere.
        reasoning = (
            getattr(reply, "reasoning", None) or getattr(reply, "reasoning_content", None) or None
        )
        if not isinstance(reasoning, str):
            reasoning = None
        calls: list[dict[str, Any]] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments},
            }
            for call in (reply.tool_calls or [])
        ]
        if not calls and self.parse_text_calls and content:
            parsed = reply_from_text(content, tools, fmt=self.fmt, reasoning=reasoning)
            if reasoning is not None:
                # The server's reasoning parser took the reasoning out of the
                # text: what is left is not what the model generated.
                del parsed["completion"]
            if cut:
                # Cut at max_tokens: trained without an end token it never sampled.
                parsed["truncated"] = True
            return parsed
        thought, content = split_reasoning(content)
        if thought is not None:
            # Calls the server parsed, but thinking left in the text (no
            # reasoning parser): it must reach neither the user nor the reward.
            reasoning = "\n\n".join(r for r in (reasoning, thought) if r)
        answer = {"content": content, "tool_calls": calls, "reasoning": reasoning}
        return {**answer, "truncated": True} if cut else answer


def reply_from_text(
    text: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    fmt: str = "auto",
    reasoning: str | None = None,
) -> dict[str, Any]:
    """A ``run_episode`` reply from a model's raw text: content, tool calls, reasoning.

    Calls are parsed with :func:`turnrl.parse_tool_calls` (typed by the
    ``tools`` schemas for XML calls); one that does not parse becomes
    ``{"error": reason}``, which the agent gets back as an error observation,
    in its place among the others (calls keep the order they were written in).
    ``<think>`` text becomes ``reasoning`` (after the ``reasoning`` given, a
    server's reasoning parser's, when there is one) and never reaches the user
    or the reward's checks. ``completion`` keeps the raw text, which is what
    :func:`turnrl.train.tokenize_rollout` trains on.
    """
    from turnrl import parse_tool_calls

    parsed = parse_tool_calls(text, fmt=fmt, tools=list(tools or []) or None)
    # Calls, read or not, in the order the message wrote them: that is the
    # order they run in and the order their results come back.
    written: list[tuple[int, dict[str, Any]]] = [
        (at, {"name": c["name"], "arguments": c.get("arguments", {})})
        for at, c in zip(parsed.call_offsets, parsed.tool_calls, strict=True)
    ]
    written += [
        (at, {"error": str(e)}) for at, e in zip(parsed.error_offsets, parsed.errors, strict=True)
    ]
    calls = [call for _, call in sorted(written, key=lambda pair: pair[0])]
    # An empty `<think></think>` block is still a block: its tags are not content.
    found = bool(calls) or parsed.reasoning is not None
    return {
        "content": parsed.content if found else text,
        "tool_calls": calls,
        # Thinking left in the text beside a server's parsed reasoning is kept
        # too, as OpenAIAgent keeps it beside calls the server parsed.
        "reasoning": "\n\n".join(r for r in (reasoning, parsed.reasoning) if r) or None,
        "completion": text,
    }

"""Judging tau2-bench's natural-language assertions with a chat model.

Most tau2-bench retail tasks add ``NL_ASSERTION`` to their reward basis:
statements about the conversation ("the agent refuses to ...") that a chat
model judges; the episode's reward is 0 unless every one is met. A judge is
any ``judge(conversation, assertions) -> list[bool]``; :class:`LLMJudge`
asks a model behind an OpenAI-compatible endpoint. Pass one to
:func:`turnrl.envs.run_episode` as ``nl_judge``. The prompt is turnrl's own,
so verdicts follow the model and that prompt, not tau2-bench's judge.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from turnrl.envs.users import ChatEndpoint
from turnrl.exceptions import TurnrlError

__all__ = [
    "JUDGE_SYSTEM_PROMPT",
    "JudgeError",
    "LLMJudge",
    "NLJudge",
    "parse_verdicts",
    "render_conversation",
]


class JudgeError(TurnrlError, RuntimeError):
    """The judge could not be reached or gave no usable verdicts."""


class NLJudge(Protocol):
    """What :func:`turnrl.envs.run_episode` needs from a judge."""

    def __call__(
        self, conversation: Sequence[Mapping[str, Any]], assertions: Sequence[str]
    ) -> list[bool]:
        """Whether the conversation meets each assertion, in order."""
        ...


JUDGE_SYSTEM_PROMPT = """You check a finished customer-service conversation against a list of
statements about how the agent should have behaved. Decide each statement on its own,
from what the conversation shows (the agent's messages, its tool calls and their results).

Answer with one JSON object and nothing else:
{"results": [{"index": <the statement's number>, "reason": "<one short sentence>",
"met": <true or false>}, ...]}
with exactly one entry per statement."""


def render_conversation(conversation: Sequence[Mapping[str, Any]]) -> str:
    """A conversation (rollout turns or chat messages) as ``role: text`` lines."""
    lines = []
    for message in conversation:
        role = message.get("role", "?")
        content = message.get("content")
        text = "" if content is None else str(content)
        if role == "tool":
            lines.append(f"tool result ({message.get('name', '?')}): {text}")
            continue
        calls = message.get("tool_calls") or []
        rendered = []
        for call in calls:
            fn = call.get("function", call) if isinstance(call, Mapping) else {}
            args = fn.get("arguments", {})
            if not isinstance(args, str):
                args = json.dumps(args, ensure_ascii=False, sort_keys=True)
            rendered.append(f"{fn.get('name', '?')}({args})")
        if rendered:
            text = (text + " " if text else "") + "[tool calls: " + "; ".join(rendered) + "]"
        lines.append(f"{role}: {text}")
    return "\n".join(lines)


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def parse_verdicts(reply: str, count: int, where: str = "judge") -> list[bool]:
    """The ``met`` flags of a judge's JSON reply, one per statement, in order."""
    fenced = _FENCE.match(reply)
    text = fenced.group(1) if fenced else reply
    excerpt = reply if len(reply) <= 200 else reply[:200] + "..."
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise JudgeError(f"{where} did not answer JSON ({e}): {excerpt!r}") from e
    results = data.get("results") if isinstance(data, Mapping) else None
    if not isinstance(results, list):
        raise JudgeError(f"{where} answered no 'results' list: {excerpt!r}")
    verdicts: dict[int, bool] = {}
    for i, item in enumerate(results):
        index = item.get("index") if isinstance(item, Mapping) else None
        met = item.get("met") if isinstance(item, Mapping) else None
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= count:
            raise JudgeError(f"{where}: results[{i}] has no statement index 1-{count}: {item!r}")
        if not isinstance(met, bool):
            raise JudgeError(f"{where}: results[{i}] has no true/false 'met': {item!r}")
        if index in verdicts:
            raise JudgeError(f"{where}: statement {index} judged twice")
        verdicts[index] = met
    missing = [i for i in range(1, count + 1) if i not in verdicts]
    if missing:
        raise JudgeError(f"{where}: no verdict for statement(s) {missing}: {excerpt!r}")
    return [verdicts[i] for i in range(1, count + 1)]


class LLMJudge:
    """An :class:`NLJudge` asking a chat model behind an OpenAI-compatible endpoint.

    Endpoint options as :class:`turnrl.envs.LLMUser`'s (retries with backoff,
    then :class:`JudgeError`); a reply that is not the asked-for JSON, or
    lacks a verdict, is a :class:`JudgeError` quoting it.
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
        timeout: float = 120.0,
        system_prompt: str = JUDGE_SYSTEM_PROMPT,
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
            what="NL-assertion judge",
            error=JudgeError,
        )
        self.system_prompt = system_prompt

    def __call__(
        self, conversation: Sequence[Mapping[str, Any]], assertions: Sequence[str]
    ) -> list[bool]:
        """Whether the conversation meets each assertion, in order."""
        if not assertions:
            return []
        statements = "\n".join(f"{i}. {a}" for i, a in enumerate(assertions, 1))
        prompt = f"Conversation:\n{render_conversation(conversation)}\n\nStatements:\n{statements}"
        reply = self.endpoint.complete(
            [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}]
        )
        return parse_verdicts(reply, len(assertions), self.endpoint.where)

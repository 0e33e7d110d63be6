"""Run an agent against a domain and a simulated user; return a rollout record."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

from turnrl.envs._base import Domain, Task
from turnrl.envs.agents import ContextLengthExceeded
from turnrl.envs.judge import JudgeError, NLJudge
from turnrl.envs.users import User
from turnrl.exceptions import InvalidInputError

__all__ = ["Agent", "Labeler", "run_episode"]

Agent = Callable[[list[dict[str, Any]], list[dict[str, Any]]], Mapping[str, Any]]
Labeler = Callable[[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]], list[Any]]


class _RawArguments(str):
    """Arguments text that is not JSON, kept as the agent wrote it."""


def _parse_call(call: Any) -> tuple[str, Any, str | None, str | None]:
    """(name, arguments, id, problem) from an OpenAI or plain ``{name, arguments}`` call."""
    if not isinstance(call, Mapping):
        return "", {}, None, "tool call is not an object"
    if "error" in call and "name" not in call and "function" not in call:
        # A call the agent's parser could not read (OpenAIAgent's text calls).
        return "", {}, call.get("id"), f"malformed tool call: {call['error']}"
    fn = call.get("function") if isinstance(call.get("function"), Mapping) else call
    name = fn.get("name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            # Kept as written: the record, the agent's next prompt and training
            # then show the call the policy made, not a valid-looking {}.
            problem = f"arguments are not valid JSON ({e})"
            return str(name or ""), _RawArguments(args), call.get("id"), problem
    if not isinstance(name, str) or not name:
        return "", args, call.get("id"), "tool call has no name"
    return name, args, call.get("id"), None


def _check_episode_options(max_steps: Any, calls_per_message: Any) -> None:
    """Raise :class:`~turnrl.exceptions.InvalidInputError` unless ``max_steps``
    and ``calls_per_message`` of :func:`run_episode` are each None (the
    benchmark's limit; every call) or a positive integer."""
    for name, value, none_means in (
        ("max_steps", max_steps, ""),
        ("calls_per_message", calls_per_message, " or None (every call)"),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise InvalidInputError(f"{name} must be a positive integer{none_means}, got {value!r}")


def _default_labeler() -> Labeler | None:
    try:
        from turnrl import label_tiers  # type: ignore[attr-defined]
    except ImportError:
        return None

    def label(turns: list[dict], gold: list[dict], kinds: dict[str, str]) -> list[Any]:
        return list(label_tiers(turns, gold, kinds).tiers)

    return label


def run_episode(
    agent: Agent,
    domain: Domain,
    task: int | str | Task,
    user: User,
    max_steps: int | None = None,
    labeler: Labeler | None = None,
    *,
    tier_rewards: Mapping[str, float] | None = None,
    group: str | None = None,
    sample: int = 0,
    nl_judge: NLJudge | None = None,
    calls_per_message: int | None = None,
) -> dict[str, Any]:
    """Run one episode and return it as a ``turnrl.rollout/1`` record.

    ``agent(messages, tools)`` gets the chat so far and the OpenAI tool
    schemas, as the domain's benchmark shows its agent: the system prompt
    ``domain.system_prompt`` (tau-bench: the policy; tau2-bench: the policy
    in tau2's agent instructions), then, where ``domain.rules.greeting`` is
    set (tau2-bench), that greeting as an assistant message, then the user's
    first line. The greeting is not a turn of the record and not a step;
    :func:`turnrl.train.rollout_messages` puts it back when given it. The
    agent returns an assistant
    message: ``content`` and optional ``tool_calls`` (OpenAI shape,
    ``{"name", "arguments"}``, or ``{"error": reason}`` for a call that could
    not be read, which the agent gets back as an error).
    :class:`turnrl.envs.OpenAIAgent` is such an agent for a policy served
    behind an OpenAI-compatible endpoint (vLLM). Every tool call in a message
    is run, in order, or only the first ``calls_per_message`` of them
    (``1`` is what tau-bench's tool-calling agent does). The calls left out,
    and those after a call that ends the episode (tau-bench's transfer to a
    human), are neither run nor recorded nor shown to the agent again; the
    turn's ``dropped_calls`` and ``meta["dropped_calls"]`` count them, and a raw
    ``completion`` (from agents that parse calls from text) still holds them;
    of calls a server parsed, only the count is kept. A message without tool
    calls goes to the user.

    The episode ends as the domain's benchmark ends it (``domain.rules``,
    :class:`~turnrl.envs.EpisodeRules`):

    * tau-bench: the user says ``###STOP###`` (in a reply: its opening line
      is not checked, as tau-bench does not check it), the agent transfers
      to a human agent, or ``max_steps`` assistant messages (default 30) pass;
    * tau2-bench: the user says ``###STOP###``, ``###TRANSFER###`` or
      ``###OUT-OF-SCOPE###`` (its opening line too), ``max_steps`` steps
      pass (default 100, counting user messages, assistant messages and tool
      executions, as tau2's orchestrator does), or 10 tool calls have failed.

    An episode that did not finish, or hit a limit, scores 0, as in both
    benchmarks; ``meta`` says why it stopped and holds the reward parts.

    An agent that raises :class:`~turnrl.envs.ContextLengthExceeded` (the
    chat no longer fits the policy's context: :class:`turnrl.engines.EngineAgent`
    and :class:`~turnrl.envs.OpenAIAgent` raise it) ends the episode there,
    as a limit does: ``stop_reason`` ``"context_length"``, no assistant turn
    for the reply that could not be generated, and a score of 0 (the task
    was not finished, as when ``max_steps`` ends it; the reward parts of the
    state reached are in ``meta``). Any other exception from the agent fails the
    episode.

    tau2-bench tasks whose reward basis holds ``NL_ASSERTION`` (most of
    retail) also need every natural-language assertion met. ``nl_judge``
    (:class:`turnrl.envs.LLMJudge`, or any ``judge(turns, assertions) ->
    list[bool]``) decides them; it is asked only when the rest of the reward
    is 1, since the reward is their product. Without one they are not scored.

    Tiers come from ``labeler(turns, gold_actions, tool_kinds)`` (one entry per
    turn, None for non-assistant turns), else from ``turnrl.label_tiers`` when
    it exists, else stay None. ``tier_rewards`` maps a tier to the per-turn
    reward written beside it; a tier it lacks is an InvalidInputError naming
    the tier, the task and the table's tiers (the episode fails), not a 0.

    Assistant turns keep what an agent gives for training: the raw
    ``completion`` text, ``truncated``, ``completion_end``, the sampled
    ``completion_ids`` and the sampler's ``completion_logprobs`` of them
    (:class:`turnrl.engines.EngineAgent`). Ids and log-probs are for
    training on the record in memory (:func:`turnrl.train.train_loop`);
    :func:`turnrl.collect.collect_rollouts` leaves them out of buffers.
    """
    task = domain.task(task)
    rules = domain.rules
    _check_episode_options(max_steps, calls_per_message)
    limit = rules.max_steps if max_steps is None else max_steps
    by_message = rules.step_unit == "message"
    episode = domain.new_episode(task)
    tools = domain.openai_tools()
    opening = user.reset(task)
    messages: list[dict[str, Any]] = [{"role": "system", "content": domain.system_prompt}]
    if rules.greeting is not None:
        # tau2's orchestrator opens the agent's chat with its greeting, which
        # the user answers: shown to the agent, but no turn and no step.
        messages.append({"role": "assistant", "content": rules.greeting})
    messages.append({"role": "user", "content": opening})
    turns: list[dict[str, Any]] = [{"role": "user", "content": opening}]
    stop_reason = "max_steps"
    steps = tool_errors = dropped_calls = 0
    limit_hit: str | None = None

    def check_limits() -> None:
        # tau2's orchestrator checks both limits after every step that does
        # not wait for tools, and the last check wins, a user's stop included.
        nonlocal limit_hit
        if steps >= limit:
            limit_hit = "max_steps"
        if rules.max_errors is not None and tool_errors >= rules.max_errors:
            limit_hit = "too_many_errors"

    if rules.stop_on_opening:
        # tau-bench never checks the opening for ###STOP###; tau2 does.
        episode.hear(opening)
        if episode.done:
            stop_reason = "user_stop"
    if by_message:
        steps += 1
        check_limits()
    while not episode.done and limit_hit is None and (by_message or steps < limit):
        steps += 1
        try:
            reply = agent(messages, tools)
        except ContextLengthExceeded:
            # No reply was generated, so there is no turn to record and the
            # step did not happen. Unfinished, it scores 0 as a limit's end does
            # (tau-bench scores an agent's error 0 too).
            steps -= 1
            limit_hit = "context_length"
            break
        content = reply.get("content") or ""
        written = list(reply.get("tool_calls") or [])
        # The calls past the cap are gone from the record and the chat alike,
        # so that training re-renders the chat the agent was shown.
        raw_calls = written if calls_per_message is None else written[:calls_per_message]
        dropped = len(written) - len(raw_calls)
        dropped_calls += dropped
        calls = []
        record_calls = []
        for i, raw in enumerate(raw_calls):
            name, args, call_id, problem = _parse_call(raw)
            call_id = call_id or f"call_{steps}_{i}"
            calls.append((name, args, call_id, problem))
            record_calls.append(
                {"name": name, "arguments": str(args) if isinstance(args, _RawArguments) else args}
            )
        turn: dict[str, Any] = {"role": "assistant", "content": content}
        if reply.get("reasoning"):
            # Kept in the record; not sent back to the agent or to the user.
            turn["reasoning"] = reply["reasoning"]
        if isinstance(reply.get("completion"), str):
            # The raw text the policy generated: what training tokenizes.
            turn["completion"] = reply["completion"]
            if isinstance(reply.get("completion_end"), str):
                # Stopped on another end token than the tokenizer's eos.
                turn["completion_end"] = reply["completion_end"]
            # The sampled ids and the sampler's log-prob of each (a list, tuple
            # or array), for training in memory, which checks them; buffers
            # leave them out. Log-probs only go with ids.
            for key in ("completion_ids", "completion_logprobs"):
                value = reply.get(key)
                if value is None or isinstance(value, (str, bytes, Mapping)):
                    break
                try:
                    turn[key] = list(value)
                except TypeError:
                    turn[key] = [value]  # not a sequence: refused later
        if reply.get("truncated"):
            # Cut at the token limit: a completion is trained without an
            # end-of-turn token, and mask_truncated can leave the turn out.
            turn["truncated"] = True
        if record_calls:
            turn["tool_calls"] = record_calls
            # The ids the agent is shown, so training re-renders the same chat.
            turn["tool_call_ids"] = [call_id for _, _, call_id, _ in calls]
        if dropped:
            turn["dropped_calls"] = dropped
        turn["tier"] = None
        turn["reward"] = None
        turns.append(turn)
        assistant_msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            assistant_msg["tool_calls"] = [
                {
                    "id": cid,
                    "type": "function",
                    "function": {
                        "name": n,
                        # Raw text goes back as a JSON string: servers decode
                        # arguments (vLLM answers 400 to text that is not JSON)
                        # and templates render a string as it is, as written.
                        "arguments": json.dumps(str(a) if isinstance(a, _RawArguments) else a),
                    },
                }
                for n, a, cid, _ in calls
            ]
        messages.append(assistant_msg)
        if calls:
            episode.say_with_calls(content)
            for ran, (name, args, call_id, problem) in enumerate(calls, start=1):
                if problem is not None:
                    obs, error = f"Error: {problem}", True
                else:
                    obs = episode.call(name, args)
                    error = episode.last_error
                tool_errors += bool(error)
                turns.append(
                    {
                        "role": "tool",
                        "name": name,
                        "content": obs,
                        "error": error,
                        "tool_call_id": call_id,
                    }
                )
                messages.append(
                    {"role": "tool", "tool_call_id": call_id, "name": name, "content": obs}
                )
                if episode.done:
                    stop_reason = "transfer"
                    # The calls after the transfer never ran: dropped as the
                    # calls past calls_per_message are, so that the turn is
                    # labelled (a gold write it never made) by what ran.
                    unrun = len(calls) - ran
                    if unrun:
                        del turn["tool_calls"][ran:], turn["tool_call_ids"][ran:]
                        del assistant_msg["tool_calls"][ran:]
                        turn["dropped_calls"] = turn.get("dropped_calls", 0) + unrun
                        dropped_calls += unrun
                    break
            if by_message:
                steps += 1
                check_limits()
            continue
        episode.say(content)
        if by_message:
            check_limits()
            if limit_hit is not None:
                break
        answer = user.step(content)
        episode.hear(answer)
        turns.append({"role": "user", "content": answer})
        messages.append({"role": "user", "content": answer})
        if episode.done:
            stop_reason = "user_stop"
        if by_message:
            steps += 1
            check_limits()

    if limit_hit is not None:
        stop_reason = limit_hit
    result = episode.reward()
    outcome = result.reward if episode.done and limit_hit is None else 0.0
    assertions = (
        list(task.facts.get("nl_assertions") or []) if "NL_ASSERTION" in task.reward_basis else []
    )
    if nl_judge is not None and assertions and outcome == 1.0:
        met = [bool(m) for m in nl_judge(turns, assertions)]
        if len(met) != len(assertions):
            raise JudgeError(f"the judge gave {len(met)} verdicts for {len(assertions)} assertions")
        result = dataclasses.replace(
            result,
            reward=result.reward * float(all(met)),
            nl_assertions=dict(zip(assertions, met, strict=True)),
        )
        outcome = result.reward

    label = labeler if labeler is not None else _default_labeler()
    if label is not None:
        tiers = list(label(turns, task.gold_actions, domain.tool_kinds))
        if len(tiers) != len(turns):
            raise ValueError(f"labeler returned {len(tiers)} tiers for {len(turns)} turns")
        for turn, tier in zip(turns, tiers, strict=True):
            if turn["role"] == "assistant":
                turn["tier"] = tier
    if tier_rewards is not None:
        from turnrl.calibration import tier_reward

        named = group if group is not None else task.id
        where = f"task {task.id!r} (group {named!r}, sample {sample!r})"
        for turn in turns:
            if turn["role"] == "assistant" and turn["tier"] is not None:
                turn["reward"] = tier_reward(tier_rewards, turn["tier"], where)

    return {
        "schema": "turnrl.rollout/1",
        "task_id": task.id,
        "group": group if group is not None else task.id,
        "sample": sample,
        "outcome": float(outcome),
        "turns": turns,
        "meta": {
            "domain": domain.name,
            "steps": steps,
            "tool_errors": tool_errors,
            "dropped_calls": dropped_calls,
            "stop_reason": stop_reason,
            "reward_info": result.as_dict(),
        },
    }

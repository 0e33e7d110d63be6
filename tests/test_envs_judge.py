"""tau2-bench's natural-language assertions: the judge and its place in the reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from turnrl import envs
from turnrl.envs.judge import JudgeError, parse_verdicts, render_conversation

TAU2 = Path(__file__).parents[1].parent / "shared" / "tau2-bench"
needs_tau2 = pytest.mark.skipif(
    not (TAU2 / "data" / "tau2").is_dir(), reason=f"tau2-bench data not found at {TAU2}"
)


def _reply(*verdicts: tuple[int, bool]) -> str:
    return json.dumps(
        {"results": [{"index": i, "reason": "because", "met": met} for i, met in verdicts]}
    )


def test_verdicts_are_read_in_statement_order_fenced_or_not():
    assert parse_verdicts(_reply((2, False), (1, True), (3, True)), 3) == [True, False, True]
    fenced = "```json\n" + _reply((1, False)) + "\n```"
    assert parse_verdicts(fenced, 1) == [False]


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ("The agent did fine.", "did not answer JSON"),
        ('{"verdicts": []}', "no 'results' list"),
        (_reply((1, True)), "no verdict for statement(s) [2]"),
        (_reply((1, True), (1, False), (2, True)), "statement 1 judged twice"),
        (_reply((1, True), (3, True)), "results[1] has no statement index 1-2"),
        (
            json.dumps({"results": [{"index": 1, "met": "yes"}, {"index": 2, "met": True}]}),
            "results[0] has no true/false 'met'",
        ),
        (json.dumps({"results": [{"index": True, "met": True}]}), "no statement index"),
    ],
)
def test_an_unusable_verdict_is_a_clear_error(reply, message):
    with pytest.raises(JudgeError, match="judge-x") as raised:
        parse_verdicts(reply, 2, where="judge-x")
    assert message in str(raised.value)


def test_the_conversation_shows_calls_and_results():
    text = render_conversation(
        [
            {"role": "user", "content": "Cancel order #W1."},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": "cancel_pending_order", "arguments": {"order_id": "#W1"}}],
            },
            {"role": "tool", "name": "cancel_pending_order", "content": "{}"},
            {"role": "assistant", "content": "Done."},
        ]
    )
    assert text.splitlines() == [
        "user: Cancel order #W1.",
        'assistant: [tool calls: cancel_pending_order({"order_id": "#W1"})]',
        "tool result (cancel_pending_order): {}",
        "assistant: Done.",
    ]


def test_llm_judge_over_http(chat_server):
    pytest.importorskip("openai")
    srv, url = chat_server([_reply((2, True), (1, False))], fail_first=1)
    judge = envs.LLMJudge("judge-model", base_url=url, api_key="k", backoff=0.01)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert judge(turns, ["The agent greets.", "The agent refuses."]) == [False, True]
    body = srv.requests[-1][1]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    prompt = body["messages"][1]["content"]
    assert "user: hi\nassistant: hello" in prompt
    assert "1. The agent greets.\n2. The agent refuses." in prompt
    assert judge(turns, []) == []  # nothing to ask
    assert len(srv.requests) == 2  # one 503, retried once; the empty list asked nothing


def test_llm_judge_http_error_names_the_endpoint(chat_server):
    pytest.importorskip("openai")
    _, url = chat_server([], fail_first=5)
    judge = envs.LLMJudge("m", base_url=url, api_key="k", max_retries=1, backoff=0.01)
    with pytest.raises(JudgeError, match=r"NL-assertion judge at .* \(model m\) unreachable"):
        judge([], ["x"])


def _solving_agent(task):
    script = [{"tool_calls": [a.as_call() for a in task.actions]}, {"content": "All done."}]
    return lambda messages, tools: script.pop(0) if script else {"content": "Bye."}


class _StopUser(envs.ScriptedUser):
    def step(self, agent_message):
        return "###STOP###"


@needs_tau2
def test_nl_assertions_take_part_in_the_reward_when_judged():
    d = envs.load("tau2:retail", root=TAU2, split="base")
    task = next(
        t
        for t in d.tasks
        if "NL_ASSERTION" in t.reward_basis and len(t.facts["nl_assertions"]) >= 2
    )
    assertions = task.facts["nl_assertions"]
    asked = []

    def judge(verdicts):
        def call(turns, statements):
            asked.append((list(turns), list(statements)))
            return verdicts

        return call

    unjudged = envs.run_episode(_solving_agent(task), d, task, _StopUser())
    assert unjudged["outcome"] == 1.0 and "nl_assertions" not in unjudged["meta"]["reward_info"]

    met = envs.run_episode(
        _solving_agent(task), d, task, _StopUser(), nl_judge=judge([True] * len(assertions))
    )
    assert met["outcome"] == 1.0
    assert met["meta"]["reward_info"]["nl_assertions"] == dict.fromkeys(assertions, True)
    turns, statements = asked[-1]
    assert statements == assertions and turns[-1]["role"] == "user"

    one_unmet = [True] * (len(assertions) - 1) + [False]
    failed = envs.run_episode(_solving_agent(task), d, task, _StopUser(), nl_judge=judge(one_unmet))
    assert failed["outcome"] == 0.0 and failed["meta"]["reward_info"]["reward"] == 0.0
    assert failed["meta"]["reward_info"]["nl_assertions"][assertions[-1]] is False

    # The judge is not asked when the rest of the reward is already 0.
    before = len(asked)
    idle = envs.run_episode(
        lambda m, t: {"content": "Hello."}, d, task, _StopUser(), nl_judge=judge([True])
    )
    assert idle["outcome"] == 0.0 and len(asked) == before

    with pytest.raises(JudgeError, match="1 verdicts for"):
        envs.run_episode(_solving_agent(task), d, task, _StopUser(), nl_judge=judge([True]))


@needs_tau2
def test_tasks_without_nl_assertions_in_their_basis_never_ask_the_judge():
    d = envs.load("tau2:airline", root=TAU2, split="base")
    task = d.tasks[0]
    assert "NL_ASSERTION" not in task.reward_basis

    def judge(turns, statements):
        raise AssertionError("asked")

    envs.run_episode(_solving_agent(task), d, task, _StopUser(), nl_judge=judge)

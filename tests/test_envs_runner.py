"""Synthetic domain, simulated users and the episode runner (no external data)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turnrl import envs
from turnrl.exceptions import InvalidInputError


def test_synthetic_is_seeded_and_solvable():
    for seed in range(8):
        d = envs.load("synthetic:airline", seed=seed)
        again = envs.load("synthetic:airline", seed=seed)
        assert json.dumps(d.tables, sort_keys=True) == json.dumps(again.tables, sort_keys=True)
        assert [t.gold_actions for t in d.tasks] == [t.gold_actions for t in again.tasks]
        assert len(d.tasks) == 24 and d.policy
        for task in d.tasks:
            _, observations = d.replay(task)
            assert not any(o.startswith("Error") for o in observations), (seed, task.id)
            ep = d.new_episode(task)
            for a in task.actions:
                ep.call(a.name, a.kwargs)
            for out in task.outputs:
                ep.say(f"It is {out}.")
            assert ep.reward().reward == 1.0
            if task.facts["kind"] != "balance":
                idle = d.new_episode(task)
                idle.say("hello")
                assert idle.reward().reward == 0.0
    other = envs.load("synthetic:airline", seed=1)
    assert json.dumps(other.tables, sort_keys=True) != json.dumps(
        envs.load("synthetic:airline", seed=2).tables, sort_keys=True
    )


def _gold_agent(task):
    """Calls each gold action once, then tells the user every required output."""
    pending = list(task.gold_actions)

    def agent(messages, tools):
        assert messages[0]["role"] == "system" and tools
        if pending:
            call = pending.pop(0)
            return {"content": "", "tool_calls": [call]}
        return {"content": "All done. " + " ".join(task.outputs)}

    return agent


def simple_labeler(turns, gold, kinds):
    """gold if a call matches a gold action exactly, else read/write/respond."""
    gold_set = [json.dumps(g, sort_keys=True) for g in gold]
    tiers = []
    for t in turns:
        if t["role"] != "assistant":
            tiers.append(None)
        elif not t.get("tool_calls"):
            tiers.append("respond")
        else:
            c = t["tool_calls"][0]
            if json.dumps(c, sort_keys=True) in gold_set:
                tiers.append("gold")
            else:
                tiers.append(kinds.get(c["name"], "error"))
    return tiers


def test_runner_with_scripted_user_scores_gold_agent():
    d = envs.load("synthetic:airline", seed=3)
    for task in d.tasks[:6]:
        rec = envs.run_episode(
            _gold_agent(task),
            d,
            task,
            envs.ScriptedUser(),
            labeler=simple_labeler,
            tier_rewards={"gold": 1.0, "read": 0.0, "respond": 0.0},
        )
        assert rec["schema"] == "turnrl.rollout/1" and rec["task_id"] == task.id
        assert rec["outcome"] == 1.0, rec["meta"]
        assert rec["meta"]["stop_reason"] == "user_stop"
        roles = [t["role"] for t in rec["turns"]]
        assert roles[0] == "user" and roles[-1] == "user"
        assert rec["turns"][-1]["content"] == "###STOP###"
        asst = [t for t in rec["turns"] if t["role"] == "assistant"]
        assert asst[0]["tier"] == "gold" and asst[0]["reward"] == 1.0
        assert asst[-1]["tier"] == "respond" and asst[-1]["reward"] == 0.0
        assert all("tier" not in t for t in rec["turns"] if t["role"] != "assistant")
        json.dumps(rec)  # a JSONL line


def test_a_tier_the_reward_table_lacks_fails_the_episode_naming_it():
    d = envs.load("synthetic:airline", seed=3)
    task = d.tasks[0]
    # The gold agent ends with a reply (respond), which the table forgot: not a 0.
    with pytest.raises(InvalidInputError) as refused:
        envs.run_episode(
            _gold_agent(task),
            d,
            task,
            envs.ScriptedUser(),
            labeler=simple_labeler,
            tier_rewards={"gold": 1.0, "read": 0.0},
            sample=2,
        )
    message = str(refused.value)
    assert f"task {task.id!r} (group {task.id!r}, sample 2)" in message
    assert "tier 'respond' has no reward in the tier table (its tiers: gold, read)" in message


def test_runner_stops_on_transfer_and_on_step_limit():
    d = envs.load("synthetic:airline", seed=0)
    task = d.tasks[0]

    def transfer(messages, tools):
        return {"tool_calls": [{"name": "transfer_to_human_agents", "arguments": {"summary": "x"}}]}

    rec = envs.run_episode(transfer, d, task, envs.ScriptedUser(), labeler=simple_labeler)
    assert rec["meta"]["stop_reason"] == "transfer" and rec["outcome"] == 0.0
    assert rec["turns"][-1] == {
        "role": "tool",
        "name": "transfer_to_human_agents",
        "content": "Transfer successful",
        "error": False,
        "tool_call_id": "call_1_0",  # the id the agent was shown
    }

    def looper(messages, tools):
        return {
            "tool_calls": [
                {
                    "id": "a",
                    "type": "function",
                    "function": {"name": "list_all_airports", "arguments": "{"},
                }
            ]
        }

    rec = envs.run_episode(
        looper, d, task, envs.ScriptedUser(), max_steps=3, labeler=lambda t, g, k: [None] * len(t)
    )
    assert rec["meta"]["stop_reason"] == "max_steps" and rec["meta"]["steps"] == 3
    assert rec["outcome"] == 0.0
    assert rec["turns"][2]["content"].startswith("Error: arguments are not valid JSON")


def test_scripted_user_answers_from_facts():
    d = envs.load("synthetic:airline", seed=0)
    task = d.tasks[0]
    u = envs.ScriptedUser()
    first = u.reset(task)
    assert task.user_id in first
    assert u.step("Can you confirm you want to proceed?") == "Yes, please go ahead."
    assert u.step("What is your user id?") == f"My user id is {task.user_id}."
    assert u.step("Anything else?") == "###STOP###"


def test_llm_user_end_to_end_over_http(chat_server):
    pytest.importorskip("openai")
    d = envs.load("synthetic:airline", seed=5)
    task = d.tasks[0]
    srv, url = chat_server(
        [f"Hi, please cancel my reservation. My user id is {task.user_id}.", "Yes.", "###STOP###"],
        fail_first=1,
    )
    user = envs.LLMUser("sim-model", base_url=url, api_key="k", backoff=0.01, temperature=0.7)
    rec = envs.run_episode(_gold_agent(task), d, task, user, labeler=simple_labeler)
    assert rec["outcome"] == 1.0
    assert rec["meta"]["stop_reason"] == "user_stop"
    paths = {p for p, _ in srv.requests}
    assert paths == {"/v1/chat/completions"}
    first = srv.requests[1][1]  # the 503 was retried
    assert first["model"] == "sim-model" and first["temperature"] == 0.7
    assert first["messages"][0]["role"] == "system"
    assert task.instruction in first["messages"][0]["content"]
    assert "###STOP###" in first["messages"][0]["content"]
    assert first["messages"][1] == {"role": "user", "content": "Hi! How can I help you today?"}
    last = srv.requests[-1][1]["messages"]
    assert last[-1]["role"] == "user" and last[-2]["role"] == "assistant"


def test_llm_user_keeps_its_thinking_to_itself(chat_server):
    """A thinking model as the user: the agent gets its reply without the
    reasoning, and a stop marker it only thought about does not stop."""
    d = envs.load("synthetic:airline", seed=0)
    thought = "<think>I must not say ###STOP### yet.</think>\n\nHi, I want to change a flight."
    _, url = chat_server([thought, "<think>done now</think>###STOP###"])
    user = envs.LLMUser("u", url, api_key="k")
    assert user.reset(d.tasks[0]) == "Hi, I want to change a flight."
    assert user.step("Sure, which one?") == "###STOP###"
    assert user.messages[-1]["content"] == "###STOP###"


def test_llm_user_unreachable_is_a_clear_error():
    pytest.importorskip("openai")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    user = envs.LLMUser(
        "m",
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key="k",
        max_retries=1,
        backoff=0.01,
        timeout=2,
    )
    d = envs.load("synthetic:airline", seed=0)
    with pytest.raises(envs.UserSimulatorError, match=rf"127\.0\.0\.1:{port}.*unreachable after 2"):
        user.reset(d.tasks[0])


def test_import_turnrl_does_not_import_openai():
    import subprocess
    import sys

    code = "import sys, turnrl, turnrl.envs; print('openai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_runner_labels_with_the_rust_labeller_by_default():
    # No labeler given: the runner uses turnrl.label_tiers (deep comparison
    # against the task's gold actions) and agrees with the simple one here.
    d = envs.load("synthetic:airline", seed=5)
    for task in d.tasks[:4]:
        rec = envs.run_episode(_gold_agent(task), d, task, envs.ScriptedUser())
        tiers = [t.get("tier") for t in rec["turns"]]
        assert tiers == simple_labeler(rec["turns"], task.gold_actions, d.tool_kinds)
        assert "gold" in tiers


# --- tau2-bench's episode loop -------------------------------------------------
#
# A plain model of tau2-bench's half-duplex orchestrator (its step and
# termination checks, restated): every user message, agent message and
# execution of an agent message's tool calls is a step; after each step that
# does not wait for tools, reaching max_steps or max_errors ends the episode,
# overriding a user stop in the same step.


def _tau2_loop_model(opening, user_replies, agent_moves, max_steps, max_errors=10):
    stop_tokens = ("###STOP###", "###TRANSFER###", "###OUT-OF-SCOPE###")
    replies, moves = iter(user_replies), iter(agent_moves)
    steps = errors = 0
    reason = None
    to, pending_errors = "user", 0
    first = True
    while reason is None or reason == "user_stop_pending":
        if reason == "user_stop_pending":
            reason = "user_stop"
            break
        if to == "user":
            text = opening if first else next(replies)
            first = False
            to = "agent"
            stopped = any(t in text for t in stop_tokens)
        elif to == "agent":
            move = next(moves)
            stopped = False
            if move[0] == "calls":
                to, pending_errors = "env", move[2]
            else:
                to = "user"
        else:
            errors += pending_errors
            to, stopped = "agent", False
        steps += 1
        if stopped:
            reason = "user_stop_pending"
        if to != "env":
            if steps >= max_steps:
                reason = "max_steps"
            if errors >= max_errors:
                reason = "too_many_errors"
    return reason, steps, errors


class _ListUser:
    def __init__(self, opening, replies):
        self.opening, self.replies = opening, list(replies)

    def reset(self, task):
        return self.opening

    def step(self, agent_message):
        return self.replies.pop(0)


def _moves_agent(moves):
    moves = list(moves)

    def agent(messages, tools):
        move = moves.pop(0)
        if move[0] == "text":
            return {"content": "How can I help?"}
        _, ok, bad = move
        calls = [{"name": "calculate", "arguments": {"expression": "1+1"}}] * ok
        calls += [{"name": "no_such_tool", "arguments": {}}] * bad
        return {"tool_calls": calls}

    return agent


USER_TEXTS = ["Hello.", "Yes.", "###STOP###", "ok ###TRANSFER###", "###OUT-OF-SCOPE### bye"]


@settings(max_examples=300, deadline=None)
@given(
    opening=st.sampled_from(USER_TEXTS),
    replies=st.lists(st.sampled_from(USER_TEXTS), min_size=60, max_size=60),
    moves=st.lists(
        st.one_of(
            st.just(("text",)),
            st.tuples(st.just("calls"), st.integers(0, 2), st.integers(0, 3)).filter(
                lambda m: m[1] + m[2] > 0
            ),
        ),
        min_size=60,
        max_size=60,
    ),
    max_steps=st.integers(1, 40),
)
def test_tau2_rules_end_episodes_as_tau2s_orchestrator(opening, replies, moves, max_steps):
    from turnrl.envs._base import TAU2_BENCH_RULES

    domain = envs.load("synthetic:airline", seed=0)
    domain.rules = TAU2_BENCH_RULES
    domain.terminate_tools = frozenset()
    want_reason, want_steps, want_errors = _tau2_loop_model(opening, replies, moves, max_steps)
    rec = envs.run_episode(
        _moves_agent(moves),
        domain,
        0,
        _ListUser(opening, replies),
        max_steps=max_steps,
        labeler=lambda t, g, k: [None] * len(t),
    )
    meta = rec["meta"]
    assert (meta["stop_reason"], meta["steps"], meta["tool_errors"]) == (
        want_reason,
        want_steps,
        want_errors,
    )
    if want_reason != "user_stop":
        assert rec["outcome"] == 0.0


def test_tau2_rules_limits_zero_a_solved_task():
    """A task solved but with 10 failed tool calls, or past the step limit,
    scores 0 under tau2-bench's rules and 1 under tau-bench's."""
    from turnrl.envs._base import TAU2_BENCH_RULES

    domain = envs.load("synthetic:airline", seed=0)
    task = next(t for t in domain.tasks if t.gold_actions)
    say = {"content": "Done: " + ", ".join(task.outputs)} if task.outputs else {"content": "Done."}
    gold = [{"tool_calls": [a.as_call()]} for a in task.actions]
    failing = [{"tool_calls": [{"name": "no_such_tool", "arguments": {}}]}] * 10
    for rules, want in ((domain.rules, 1.0), (TAU2_BENCH_RULES, 0.0)):
        domain.rules = rules
        script = failing + gold + [say]

        def agent(messages, tools, script=script):
            return script.pop(0) if script else {"content": "Bye."}

        user = _ListUser("Hi.", ["###STOP###"] * 5)
        rec = envs.run_episode(agent, domain, task, user, max_steps=200)
        assert rec["outcome"] == want, (rules, rec["meta"])
        if want == 0.0:
            assert rec["meta"]["stop_reason"] == "too_many_errors"
            assert rec["meta"]["tool_errors"] == 10


# --- calls_per_message: tau-bench's tool-calling agent runs one call a message

CALCULATIONS = [
    {"name": "calculate", "arguments": {"expression": e}} for e in ("1+1", "2*3", "5*5")
]


def _one_message_agent(calls):
    """Sends ``calls`` in one message, then text: (agent, the chats it was sent)."""
    sent: list[list[dict]] = []

    def agent(messages, tools):
        sent.append(copy.deepcopy(messages))
        if len(sent) == 1:
            return {"content": "On it.", "tool_calls": calls, "completion": "raw calls text"}
        return {"content": "Anything else?"}

    return agent, sent


@pytest.mark.parametrize("cap", [None, 1, 2, 3, 4])
def test_calls_per_message_runs_records_and_shows_only_the_first_calls(cap):
    d = envs.load("synthetic:airline", seed=0)
    agent, sent = _one_message_agent(CALCULATIONS)
    rec = envs.run_episode(agent, d, 0, envs.ScriptedUser(), calls_per_message=cap)
    kept = 3 if cap is None else min(cap, 3)
    first = rec["turns"][1]
    assert first["tool_calls"] == CALCULATIONS[:kept]
    assert first["tool_call_ids"] == [f"call_1_{i}" for i in range(kept)]
    assert first.get("dropped_calls", 0) == 3 - kept  # only there when some were
    assert first["completion"] == "raw calls text"  # what the policy generated, kept whole
    results = [t["content"] for t in rec["turns"] if t["role"] == "tool"]
    assert results == ["2.0", "6.0", "25.0"][:kept]
    assert rec["meta"]["dropped_calls"] == 3 - kept
    # The agent's next chat shows the kept calls and their results, nothing of the others.
    shown = sent[1][2:]
    assert [m["role"] for m in shown] == ["assistant"] + ["tool"] * kept
    assert [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in shown[0]["tool_calls"]
    ] == [(c["name"], c["arguments"]) for c in CALCULATIONS[:kept]]


def test_first_call_only_leaves_a_later_write_undone_and_labelled_by_what_ran():
    d = envs.load("synthetic:airline", seed=0)
    task = d.tasks[0]
    calls = [{"name": "get_user_details", "arguments": {"user_id": task.user_id}}]
    calls += [a.as_call() for a in task.actions]
    assert task.facts["kind"] == "cancel" and not task.outputs
    outcomes, tiers = {}, {}
    for cap in (None, 1):
        agent, _ = _one_message_agent(calls)
        rec = envs.run_episode(agent, d, task, envs.ScriptedUser(), calls_per_message=cap)
        outcomes[cap] = (rec["outcome"], rec["meta"]["reward_info"]["db_match"])
        tiers[cap] = rec["turns"][1]["tier"]
    assert outcomes == {None: (1.0, True), 1: (0.0, False)}
    assert tiers == {None: "gold", 1: "read"}


@pytest.mark.parametrize("cap", [None, 5])
def test_calls_after_a_transfer_are_dropped_and_the_turn_labelled_by_what_ran(cap):
    d = envs.load("synthetic:airline", seed=0)
    task = d.tasks[0]
    assert task.facts["kind"] == "cancel" and task.actions
    transfer = {"name": "transfer_to_human_agents", "arguments": {"summary": "x"}}
    gold = [a.as_call() for a in task.actions]
    agent, _ = _one_message_agent([transfer, *gold])
    rec = envs.run_episode(agent, d, task, envs.ScriptedUser(), calls_per_message=cap)
    alone, _ = _one_message_agent([transfer])
    transfer_only = envs.run_episode(alone, d, task, envs.ScriptedUser())
    first = rec["turns"][1]
    assert rec["meta"]["stop_reason"] == "transfer" and rec["outcome"] == 0.0
    # The gold write after the transfer never ran: neither in the record nor
    # judged, but counted.
    assert first["tool_calls"] == [transfer] and first["tool_call_ids"] == ["call_1_0"]
    assert first["dropped_calls"] == rec["meta"]["dropped_calls"] == len(gold)
    assert first["tier"] == transfer_only["turns"][1]["tier"] != "gold"
    assert [t["name"] for t in rec["turns"] if t["role"] == "tool"] == [transfer["name"]]
    assert first["completion"] == "raw calls text"


def test_a_malformed_first_call_is_the_one_kept():
    d = envs.load("synthetic:airline", seed=0)
    agent, sent = _one_message_agent([{"error": "invalid JSON"}, *CALCULATIONS[:2]])
    rec = envs.run_episode(agent, d, 0, envs.ScriptedUser(), calls_per_message=1)
    first = rec["turns"][1]
    assert first["tool_calls"] == [{"name": "", "arguments": {}}]
    assert first["dropped_calls"] == 2
    tools = [t for t in rec["turns"] if t["role"] == "tool"]
    assert len(tools) == 1 and tools[0]["error"]
    assert tools[0]["content"] == "Error: malformed tool call: invalid JSON"
    assert (rec["meta"]["tool_errors"], rec["meta"]["dropped_calls"]) == (1, 2)
    assert len(sent[1][2]["tool_calls"]) == 1


@pytest.mark.parametrize("bad", [0, -1, True, False, 1.0, "1"])
def test_calls_per_message_must_be_a_positive_integer(bad):
    d = envs.load("synthetic:airline", seed=0)
    agent, sent = _one_message_agent(CALCULATIONS)
    message = rf"calls_per_message must be a positive integer or None .*got {re.escape(repr(bad))}"
    with pytest.raises(InvalidInputError, match=message):
        envs.run_episode(agent, d, 0, envs.ScriptedUser(), calls_per_message=bad)
    assert sent == []


# --- an episode that outgrows the policy's context --------------------------


def _out_of_context_after(moves):
    """An agent that makes ``moves`` (replies), then finds no room in its context."""
    script = list(moves)

    def agent(messages, tools):
        if script:
            return script.pop(0)
        raise envs.ContextLengthExceeded.no_room(9000, 8192)

    return agent


def test_running_out_of_context_ends_the_episode_unfinished():
    d = envs.load("synthetic:airline", seed=0)
    task = next(t for t in d.tasks if t.gold_actions and not t.outputs)
    gold = [{"content": "", "tool_calls": [a]} for a in task.gold_actions]
    rec = envs.run_episode(_out_of_context_after(gold), d, task, envs.ScriptedUser())
    meta = rec["meta"]
    assert meta["stop_reason"] == "context_length" and meta["steps"] == len(gold)
    # The work was done before the context ran out (the database is the gold
    # one), but the task was not finished: 0, as when max_steps ends it.
    assert rec["outcome"] == 0.0 and meta["reward_info"]["db_match"] is True
    # No turn for the reply that was never generated.
    assert rec["turns"][-1]["role"] == "tool"
    assert sum(t["role"] == "assistant" for t in rec["turns"]) == len(gold)
    json.dumps(rec)

    # Out of context at once (the policy text alone fills it): nothing done.
    rec = envs.run_episode(_out_of_context_after([]), d, task, envs.ScriptedUser())
    assert [t["role"] for t in rec["turns"]] == ["user"]
    assert rec["meta"]["stop_reason"] == "context_length" and rec["meta"]["steps"] == 0
    assert rec["outcome"] == 0.0 and rec["meta"]["reward_info"]["db_match"] is False


def test_running_out_of_context_under_tau2_rules_counts_the_steps_taken():
    from turnrl.envs._base import TAU2_BENCH_RULES

    d = envs.load("synthetic:airline", seed=0)
    d.rules = TAU2_BENCH_RULES
    moves = [{"content": "Let me check."}]  # to the user, who answers
    user = _ListUser("Hi.", ["Please go on."] * 3)
    rec = envs.run_episode(_out_of_context_after(moves), d, 0, user)
    # The opening, the agent's message and the user's reply: three steps.
    assert rec["meta"]["stop_reason"] == "context_length" and rec["meta"]["steps"] == 3
    assert [t["role"] for t in rec["turns"]] == ["user", "assistant", "user"]


def test_other_agent_errors_still_fail_the_episode():
    d = envs.load("synthetic:airline", seed=0)

    def broken(messages, tools):
        raise envs.AgentError("policy endpoint down")

    with pytest.raises(envs.AgentError, match="down"):
        envs.run_episode(broken, d, 0, envs.ScriptedUser())


def test_tau_bench_never_checks_the_users_opening_for_a_stop():
    """tau-bench's agent loop answers whatever reset returned; only replies end it."""
    d = envs.load("synthetic:airline", seed=0)
    sent = []

    def agent(messages, tools):
        sent.append(messages[-1]["content"])
        return {"content": "How can I help?"}

    user = _ListUser("###STOP### Hi, I need help.", ["Thanks.", "###STOP###"])
    rec = envs.run_episode(agent, d, 0, user)
    assert sent == ["###STOP### Hi, I need help.", "Thanks."]
    assert [t["role"] for t in rec["turns"]] == ["user", "assistant", "user", "assistant", "user"]
    assert rec["meta"]["stop_reason"] == "user_stop" and rec["meta"]["steps"] == 2


def test_retry_after_is_waited_on_capped_and_never_below_the_backoff(chat_server, monkeypatch):
    from datetime import datetime, timedelta, timezone
    from email.utils import format_datetime

    from turnrl.envs import users

    waits = []
    monkeypatch.setattr(users.time, "sleep", waits.append)
    busy = b'{"error": {"message": "busy"}}'
    # An HTTP date 2 minutes ahead: capped at 60 s whatever the clock's second.
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=120), usegmt=True)
    answers = [
        (429, busy, {"Retry-After": "7"}),  # backoff 1 s: the 7 s asked
        (503, busy, {"Retry-After": later}),  # backoff 2 s: a date, capped at 60 s
        (429, busy, {"Retry-After": "3600"}),  # backoff 4 s: capped at 60 s
        (503, busy, {"Retry-After": "soon"}),  # unreadable: the backoff, 8 s
        (429, busy, {"Retry-After": "1.5"}),  # less than the backoff (16 s): 16 s
        (500, busy, {"Retry-After": "40"}),  # not a 429 or 503: the backoff, 32 s
        (429, busy, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),  # past: 64 s backoff
        "Hello.",
    ]
    _, url = chat_server(answers)
    endpoint = users.ChatEndpoint("m", url, api_key="k", max_retries=7, backoff=1.0)
    assert endpoint.complete([{"role": "user", "content": "hi"}]) == "Hello."
    assert waits == [7.0, 60.0, 60.0, 8.0, 16.0, 32.0, 64.0]


def test_a_retry_after_too_long_for_a_float_is_capped_not_ignored(chat_server, monkeypatch):
    from turnrl.envs import users

    waits = []
    monkeypatch.setattr(users.time, "sleep", waits.append)
    busy = b'{"error": {"message": "busy"}}'
    answers = [
        # A count of seconds (any number of digits) past float's range asks
        # for longer than an hour does: the cap, not the backoff's 1 s.
        (429, busy, {"Retry-After": "9" * 400}),
        (503, busy, {"Retry-After": "nan"}),  # no number of seconds: the backoff, 2 s
        "Hello.",
    ]
    _, url = chat_server(answers)
    endpoint = users.ChatEndpoint("m", url, api_key="k", max_retries=2, backoff=1.0)
    assert endpoint.complete([{"role": "user", "content": "hi"}]) == "Hello."
    assert waits == [users.MAX_RETRY_AFTER, 2.0]


def test_an_llm_user_prompt_of_ones_own_may_hold_braces(chat_server):
    _, url = chat_server(["Hi."])
    template = 'Answer as JSON: {"reply": "..."}. {{literal}} Your task: {instruction}'
    user = envs.LLMUser("u", url, api_key="k", system_prompt=template)
    task = envs.load("synthetic:airline", seed=0).tasks[0]
    assert user.reset(task) == "Hi."
    assert user.messages[0]["content"] == (
        'Answer as JSON: {"reply": "..."}. {{literal}} Your task: ' + task.instruction
    )
    # Without the one placeholder the user would not know its task: refused, named.
    with pytest.raises(InvalidInputError, match=r"system_prompt has no \{instruction\}"):
        envs.LLMUser("u", url, api_key="k", system_prompt="Be a customer {name}.")
    with pytest.raises(InvalidInputError, match="system_prompt must be text"):
        envs.LLMUser("u", url, api_key="k", system_prompt=3)


TAU = Path(__file__).parents[1].parent / "shared" / "tau-bench"


@pytest.mark.parametrize("name", ["synthetic:airline", "taubench:airline", "taubench:retail"])
def test_a_tau_bench_llm_user_is_shown_tau_benchs_layout(chat_server, name):
    """tau-bench's user simulator: a system message of one line saying whom it
    plays, a blank line, "Instruction: " and the task's instruction, a blank
    line, "Rules:" and one rule a line (six, the last on ###STOP###); then the
    greeting as a "user" message, and only the agent's messages without tool
    calls, each as a "user" message."""
    pytest.importorskip("openai")
    if name.startswith("taubench:"):
        if not (TAU / "tau_bench").is_dir():
            pytest.skip(f"tau-bench data not found at {TAU}")
        d = envs.load(name, root=TAU, split="test")
    else:
        d = envs.load(name, seed=0)
    task = d.tasks[0]
    assert task.user_system_prompt is None
    srv, url = chat_server(["Hi, I need help.", "###STOP###"])

    def agent(messages, tools):
        if len(messages) == 2:
            return {"content": "One moment.", "tool_calls": [task.gold_actions[0]]}
        return {"content": "Done."}

    rec = envs.run_episode(agent, d, task, envs.LLMUser("u", url, api_key="k"))
    assert rec["meta"]["stop_reason"] == "user_stop"
    system = envs.users.DEFAULT_SYSTEM_PROMPT.replace("{instruction}", task.instruction)
    greeting = {"role": "user", "content": "Hi! How can I help you today?"}
    assert [body["messages"] for _, body in srv.requests] == [
        [{"role": "system", "content": system}, greeting],
        [
            {"role": "system", "content": system},
            greeting,
            {"role": "assistant", "content": "Hi, I need help."},
            {"role": "user", "content": "Done."},
        ],
    ]
    intro, after = system.split("\n\n", 1)
    head = f"Instruction: {task.instruction}\n\nRules:\n"
    assert intro.startswith("You are") and "\n" not in intro and after.startswith(head)
    rules = after[len(head) :].split("\n")
    assert len(rules) == 6 and all(rule.startswith("- ") for rule in rules)
    assert "'###STOP###'" in rules[3] and "TRANSFER" not in system

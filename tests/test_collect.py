"""A served policy as an agent, and collecting its episodes into a buffer."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import turnrl
from turnrl import envs
from turnrl.calibration import load_tier_rewards
from turnrl.cli import main
from turnrl.collect import CollectSummary, collect_rollouts, select_tasks

pytest.importorskip("openai")


def _call(call_id, name, arguments):
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def test_openai_agent_sends_tools_and_returns_structured_calls(chat_server):
    d = envs.load("synthetic:airline", seed=0)
    srv, url = chat_server(
        [{"content": "", "tool_calls": [_call("c1", "calculate", {"expression": "1+1"})]}]
    )
    agent = envs.OpenAIAgent("policy", url, api_key="k", max_tokens=64, temperature=0.5)
    reply = agent([{"role": "user", "content": "hi"}], d.openai_tools())
    assert reply["tool_calls"] == [_call("c1", "calculate", {"expression": "1+1"})]
    body = srv.requests[-1][1]
    assert body["model"] == "policy" and body["max_tokens"] == 64 and body["temperature"] == 0.5
    assert [t["function"]["name"] for t in body["tools"]] == [
        t["function"]["name"] for t in d.openai_tools()
    ]


def test_openai_agent_sends_top_p_and_top_k_only_when_given(chat_server):
    import pytest

    from turnrl.exceptions import InvalidInputError

    srv, url = chat_server([], default="Hello.")
    chat = [{"role": "user", "content": "hi"}]
    envs.OpenAIAgent("p", url, api_key="k")(chat, [])
    assert "top_p" not in srv.requests[-1][1] and "top_k" not in srv.requests[-1][1]
    envs.OpenAIAgent("p", url, api_key="k", top_p=0.8, top_k=20, extra_body={"x": 1})(chat, [])
    body = srv.requests[-1][1]
    assert (body["top_p"], body["top_k"], body["x"]) == (0.8, 20, 1)
    for off in (0, -1):  # off, vLLM's -1 included: sent as -1, over the server's default
        envs.OpenAIAgent("p", url, api_key="k", top_k=off)(chat, [])
        assert srv.requests[-1][1]["top_k"] == -1, off
    for bad in ({"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"top_k": 2.5}):
        with pytest.raises(InvalidInputError, match=next(iter(bad))):
            envs.OpenAIAgent("p", url, api_key="k", **bad)


def test_openai_agent_sends_min_p_and_repetition_penalty_only_when_given(chat_server):
    import pytest

    from turnrl.exceptions import InvalidInputError

    srv, url = chat_server([], default="Hello.")
    chat = [{"role": "user", "content": "hi"}]
    envs.OpenAIAgent("p", url, api_key="k")(chat, [])
    assert "min_p" not in srv.requests[-1][1] and "repetition_penalty" not in srv.requests[-1][1]
    agent = envs.OpenAIAgent(
        "p", url, api_key="k", min_p=0.05, repetition_penalty=1.1, extra_body={"x": 1}
    )
    agent(chat, [])
    body = srv.requests[-1][1]
    assert (body["min_p"], body["repetition_penalty"], body["x"]) == (0.05, 1.1, 1)
    assert "top_k" not in body
    # Given at their off values, they are sent: over the server's defaults.
    envs.OpenAIAgent("p", url, api_key="k", min_p=0, repetition_penalty=1)(chat, [])
    body = srv.requests[-1][1]
    assert (body["min_p"], body["repetition_penalty"]) == (0.0, 1.0)
    for bad in ({"min_p": 1.5}, {"min_p": -0.1}, {"repetition_penalty": 0}):
        with pytest.raises(InvalidInputError, match=next(iter(bad))):
            envs.OpenAIAgent("p", url, api_key="k", **bad)


def test_collect_local_engines_sample_with_the_sampling_options(monkeypatch):
    """collect's --engine builds its engine with --top-p, --top-k, --min-p and
    --repetition-penalty, off where not given."""
    from turnrl import cli, engines

    made = []

    class Recorder:
        def __init__(self, model, **kwargs):
            made.append(kwargs)

    monkeypatch.setattr(engines, "VLLMEngine", Recorder)
    parser = cli.build_parser()
    argv = ["rollouts", "collect", "--env", "e", "--agent-model", "m", "--out", "o"]
    argv += ["--engine", "vllm"]
    cli._local_agent(parser.parse_args(argv))
    sampling = ["--top-p", "0.9", "--top-k", "5", "--min-p", "0.1", "--repetition-penalty", "1.2"]
    cli._local_agent(parser.parse_args([*argv, *sampling]))
    taken = [{k: m[k] for k in ("top_p", "top_k", "min_p", "repetition_penalty")} for m in made]
    assert taken == [
        {"top_p": 1.0, "top_k": None, "min_p": 0.0, "repetition_penalty": 1.0},
        {"top_p": 0.9, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2},
    ]


def test_replies_cut_at_max_tokens_are_recorded_as_truncated(chat_server):
    d = envs.load("synthetic:airline", seed=0)
    cut_call = _call("c1", "get_user_details", {"user_id": d.tasks[0].user_id})
    _, url = chat_server(
        [
            {"content": "I will look that u", "finish_reason": "length"},
            {"content": "", "tool_calls": [cut_call], "finish_reason": "length"},
            {"content": "All done."},
        ]
    )
    agent = envs.OpenAIAgent("p", url, api_key="k", max_tokens=8)
    chat = [{"role": "user", "content": "hi"}]
    # Text the agent parsed keeps its completion, trained without an end token.
    text = agent(chat, d.openai_tools())
    assert text["truncated"] is True and text["completion"] == "I will look that u"
    assert agent(chat, d.openai_tools())["truncated"] is True  # calls the server parsed
    assert "truncated" not in agent(chat, d.openai_tools())

    # Behind a reasoning parser too (the server took the thinking out of the text).
    _, url = chat_server(
        [{"content": "I will look that u", "reasoning": "look up", "finish_reason": "length"}]
    )
    reply = envs.OpenAIAgent("p", url, api_key="k")(chat, d.openai_tools())
    assert reply["truncated"] is True and "completion" not in reply

    # The episode's record says so, for training (no end token; --mask-truncated).
    _, url = chat_server([{"content": "Let me chec", "finish_reason": "length"}])
    agent = envs.OpenAIAgent("p", url, api_key="k", max_tokens=8)
    record = envs.run_episode(agent, d, d.tasks[0], envs.ScriptedUser(max_replies=1))
    first = next(t for t in record["turns"] if t["role"] == "assistant")
    assert first["truncated"] is True and first["completion"] == "Let me chec"


def test_openai_agent_parses_calls_left_in_the_text(chat_server):
    text = (
        "<think>look the user up</think>Checking. "
        '<tool_call>{"name": "get_user_details", "arguments": {"user_id": "u1"}}</tool_call>'
        "<tool_call>{not json</tool_call>"
    )
    _, url = chat_server([text])
    reply = envs.OpenAIAgent("p", url, api_key="k")([{"role": "user", "content": "hi"}], [])
    assert reply["content"] == "Checking."
    assert reply["reasoning"] == "look the user up"
    assert reply["tool_calls"][0] == {"name": "get_user_details", "arguments": {"user_id": "u1"}}
    assert "invalid JSON" in reply["tool_calls"][1]["error"]


def test_a_malformed_call_is_an_error_observation_and_the_episode_goes_on(chat_server):
    d = envs.load("synthetic:airline", seed=0)
    task = d.tasks[0]
    _, url = chat_server(
        [
            '<tool_call>{"name": "calculate", "arguments": {"expression": "2*3"}}</tool_call>'
            "<tool_call>{oops</tool_call>",
            "Anything else?",
        ],
        default="Goodbye.",
    )
    rec = envs.run_episode(envs.OpenAIAgent("p", url, api_key="k"), d, task, envs.ScriptedUser())
    tools = [t for t in rec["turns"] if t["role"] == "tool"]
    assert tools[0]["content"] == "6.0"
    assert tools[1]["error"] and tools[1]["content"].startswith("Error: malformed tool call:")
    assert rec["meta"]["tool_errors"] == 1


def test_calls_run_in_the_order_written_whether_or_not_they_parse(chat_server):
    d = envs.load("synthetic:airline", seed=0)
    good = '<tool_call>{"name": "calculate", "arguments": {"expression": "%s"}}</tool_call>'
    xml = "<tool_call><function=calculate><parameter=expression>5*5</parameter></function>"
    _, url = chat_server(
        [
            "<tool_call>{oops</tool_call>" + good % "2*3" + xml + "</tool_call>"
            "<tool_call>[1]</tool_call>" + good % "1+1",
            "Anything else?",
        ],
        default="Goodbye.",
    )
    rec = envs.run_episode(
        envs.OpenAIAgent("p", url, api_key="k"), d, d.tasks[0], envs.ScriptedUser()
    )
    results = [t for t in rec["turns"] if t["role"] == "tool"][:5]
    shown = [("error" if t.get("error") else t["content"]) for t in results]
    assert shown == ["error", "6.0", "25.0", "error", "2.0"]


def test_agent_endpoint_failure_names_it(chat_server):
    _, url = chat_server([], fail_first=9)
    agent = envs.OpenAIAgent("p", url, api_key="k", max_retries=1, backoff=0.01)
    with pytest.raises(envs.AgentError, match=r"agent policy at .* \(model p\) unreachable"):
        agent([{"role": "user", "content": "hi"}], [])


def test_answers_that_are_not_chat_completions_are_retried_then_named(chat_server):
    broken = [
        b'{"choices": [ {"index": 0, "mess',  # cut off
        b"<html>proxy error</html>",
        b'{"error": {"message": "model overloaded"}}',
        b'{"id": "x", "object": "chat.completion", "created": 0, "model": "p", '
        b'"choices": [{"index": 0, "message": null, "finish_reason": "stop"}]}',
        (408, b'{"error": {"message": "timeout"}}'),
    ]
    server, url = chat_server([*broken, "fine"])
    agent = envs.OpenAIAgent("p", url, api_key="k", max_retries=5, backoff=0.0)
    assert agent([{"role": "user", "content": "hi"}], [])["content"] == "fine"
    assert len(server.requests) == 6
    _, url = chat_server(broken[2:3] * 2)
    agent = envs.OpenAIAgent("p", url, api_key="k", max_retries=1, backoff=0.0)
    with pytest.raises(
        envs.AgentError,
        match=r"agent policy at .* \(model p\) answered no chat completion after 2 attempts: "
        r".*model overloaded",
    ):
        agent([{"role": "user", "content": "hi"}], [])


def _completion_with(message):
    """A chat completion's body whose one choice holds ``message`` as given."""
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    body = {"id": "x", "object": "chat.completion", "created": 0, "model": "p", "choices": [choice]}
    return json.dumps(body).encode()


# Choices whose message is not an assistant message: text in its place, content
# that is not text (a number; a list of parts, as some hosted APIs answer), tool
# calls that are not a list of calls, a call without its function.
NOT_MESSAGES = [
    "Sure.",
    {"role": "assistant", "content": 5},
    {"role": "assistant", "content": [{"type": "text", "text": "Sure."}]},
    {"role": "assistant", "content": "x", "tool_calls": {"id": "c1"}},
    {"role": "assistant", "content": "x", "tool_calls": ["c1"]},
    {"role": "assistant", "content": "x", "tool_calls": [{"id": "c1", "type": "function"}]},
    {"role": "assistant", "content": "x", "tool_calls": [{"id": "c1", "function": None}]},
]


@pytest.mark.parametrize("message", NOT_MESSAGES)
def test_a_choice_that_is_not_a_chat_message_is_retried_then_named(chat_server, message):
    chat = [{"role": "user", "content": "hi"}]
    server, url = chat_server([_completion_with(message), "fine"])
    agent = envs.OpenAIAgent("p", url, api_key="k", max_retries=1, backoff=0.0)
    assert agent(chat, [])["content"] == "fine"
    assert len(server.requests) == 2
    _, url = chat_server([_completion_with(message)] * 2)
    agent = envs.OpenAIAgent("p", url, api_key="k", max_retries=1, backoff=0.0)
    with pytest.raises(envs.AgentError, match=r"agent policy at .* answered no chat completion"):
        agent(chat, [])
    d = envs.load("synthetic:airline", seed=0)
    _, url = chat_server([_completion_with(message)] * 2)
    user = envs.LLMUser("u", url, api_key="k", max_retries=1, backoff=0.0)
    with pytest.raises(
        envs.UserSimulatorError, match=r"user simulator at .* answered no chat completion"
    ):
        user.reset(d.tasks[0])


def test_think_text_beside_server_parsed_calls_is_reasoning(chat_server):
    """A hermes tool parser without a reasoning parser leaves Qwen3's thinking
    in the content next to the calls it parsed."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    _, url = chat_server(
        [
            {"content": "<think>secret plan</think>\n\n", "tool_calls": [call]},
            {"content": "<think>more</think>", "reasoning_content": "parsed", "tool_calls": [call]},
        ]
    )
    agent = envs.OpenAIAgent("p", url, api_key="k")
    reply = agent([{"role": "user", "content": "hi"}], [])
    assert reply["content"] == "" and reply["reasoning"] == "secret plan"
    assert reply["tool_calls"][0]["function"]["name"] == "f"
    assert agent([{"role": "user", "content": "hi"}], [])["reasoning"] == "parsed\n\nmore"


def test_think_text_beside_a_servers_reasoning_is_kept_with_or_without_calls(chat_server):
    """The server's reasoning parser gave some reasoning and more thinking was
    left in the content: both are kept, whether the server parsed the calls
    or they are read from the text (where none is there too)."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    text_call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    _, url = chat_server(
        [
            {"content": "<think>more</think>Done.", "reasoning": "parsed", "tool_calls": [call]},
            {"content": "<think>more</think>Done.", "reasoning": "parsed"},
            {"content": f"<think>more</think>{text_call}", "reasoning": "parsed"},
        ]
    )
    agent = envs.OpenAIAgent("p", url, api_key="k")
    for content, calls in (("Done.", 1), ("Done.", 0), ("", 1)):
        reply = agent([{"role": "user", "content": "hi"}], [])
        assert reply["reasoning"] == "parsed\n\nmore"
        assert (reply["content"], len(reply["tool_calls"])) == (content, calls)


def test_errors_before_any_request_are_not_retried(chat_server):
    server, url = chat_server(["fine"])
    agent = envs.OpenAIAgent("p", url, api_key="k", max_tokens=float("nan"), backoff=10.0)
    with pytest.raises(ValueError, match="JSON"):
        agent([{"role": "user", "content": "hi"}], [])
    assert server.requests == []


@pytest.mark.parametrize(
    "option",
    [
        {"max_retries": -1},
        {"max_retries": 1.5},
        {"max_retries": True},
        {"backoff": -1.0},
        {"backoff": math.nan},
        {"timeout": 0},
        {"timeout": -1.0},
        {"timeout": math.inf},
        {"temperature": math.nan},
        {"temperature": -0.5},
        {"temperature": math.inf},
        {"temperature": "0.7"},
    ],
)
def test_endpoints_refuse_sampling_and_retry_options_out_of_range(option):
    """Refused when made, naming the option: max_retries -1 sent nothing and
    said the endpoint was unreachable after 0 attempts; a negative backoff
    failed in time.sleep after the first failure; a NaN temperature went to
    the user's and the judge's endpoints, refused there at the first episode
    (the agent's was checked already)."""
    (name,) = option
    for make in (envs.OpenAIAgent, envs.LLMUser, envs.LLMJudge):
        with pytest.raises(turnrl.InvalidInputError, match=name):
            make("m", "http://127.0.0.1:9/v1", api_key="k", **option)


def test_think_text_in_the_middle_is_taken_out_as_the_text_parser_does(chat_server):
    text = "Let me check your reservation. <think>need the user id</think> One moment."
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    _, url = chat_server([{"content": text, "tool_calls": [call]}])
    reply = envs.OpenAIAgent("p", url, api_key="k")([{"role": "user", "content": "hi"}], [])
    parsed = turnrl.parse_tool_calls(text)
    assert (reply["content"], reply["reasoning"]) == (parsed.content, parsed.reasoning)
    assert reply["content"].startswith("Let me check") and reply["reasoning"] == "need the user id"


def test_the_reasoning_field_of_current_vllm_is_read(chat_server):
    _, url = chat_server([{"content": "Done.", "reasoning": "plan"}])
    reply = envs.OpenAIAgent("p", url, api_key="k")([{"role": "user", "content": "hi"}], [])
    assert reply["reasoning"] == "plan" and reply["content"] == "Done."
    assert "completion" not in reply  # the content alone is not what was generated


def test_select_tasks():
    d = envs.load("synthetic:airline", seed=0)
    assert select_tasks(d, "all") == d.tasks
    assert select_tasks(d, "2:5") == d.tasks[2:5]
    assert select_tasks(d, ":2") == d.tasks[:2]
    assert select_tasks(d, f"0,{d.tasks[3].id}") == [d.tasks[0], d.tasks[3]]
    assert select_tasks(d, "-3:") == d.tasks[-3:]
    assert select_tasks(d, f"0:{len(d.tasks)}") == d.tasks
    with pytest.raises(turnrl.InvalidInputError, match="selects none"):
        select_tasks(d, "5:2")
    # Python's slicing would clip these silently.
    for spec in ("0:99", "90:", f"-{len(d.tasks) + 1}:"):
        with pytest.raises(turnrl.InvalidInputError, match=f"has {len(d.tasks)} tasks"):
            select_tasks(d, spec)
    with pytest.raises(turnrl.InvalidInputError, match="START:STOP"):
        select_tasks(d, "a:b")


def test_collect_writes_every_episode_with_tiers(chat_server, tmp_path):
    d = envs.load("synthetic:airline", seed=0)
    _, url = chat_server([], default="How can I help?")
    out = tmp_path / "runs" / "step.jsonl.zst"
    seen: list[tuple[int, int]] = []
    summary = collect_rollouts(
        d,
        lambda: envs.OpenAIAgent("p", url, api_key="k"),
        envs.ScriptedUser,
        out,
        tasks=d.tasks[:3],
        samples=2,
        workers=3,
        progress=False,
        on_episode=lambda finished, total: seen.append((finished, total)),
    )
    assert summary.records == 6 and not summary.failures
    assert seen == [(n, 6) for n in range(1, 7)]
    records = list(turnrl.iter_rollout_records(out))
    assert summary.task_outcomes == {t.id: [0.0, 0.0] for t in d.tasks[:3]}
    assert sorted((r["task_id"], r["sample"]) for r in records) == sorted(
        (t.id, s) for t in d.tasks[:3] for s in range(2)
    )
    assert all(r["group"] == r["task_id"] for r in records)
    # Every assistant turn only talked: tier "respond", with the naive preset's reward.
    naive = load_tier_rewards("naive")
    turns = [t for r in records for t in r["turns"] if t["role"] == "assistant"]
    assert turns and all(t["tier"] == "respond" for t in turns)
    assert all(t["reward"] == naive["respond"] for t in turns)
    assert summary.tiers["respond"] == len(turns)


def test_collect_keeps_the_episodes_that_did_not_fail(chat_server, tmp_path):
    d = envs.load("synthetic:airline", seed=0)
    _, url = chat_server([], default="Hello.")
    calls = []

    def make_agent():
        agent = envs.OpenAIAgent("p", url, api_key="k")
        calls.append(agent)
        if len(calls) == 2:
            agent.endpoint.client.base_url = "http://127.0.0.1:9/v1"  # nothing listens
            agent.endpoint.max_retries = 0
        return agent

    out = tmp_path / "b.jsonl"
    summary = collect_rollouts(
        d, make_agent, envs.ScriptedUser, out, tasks=d.tasks[:3], workers=1, progress=False
    )
    assert summary.records == 2 and len(summary.failures) == 1
    task_id, sample, error = summary.failures[0]
    assert task_id == d.tasks[1].id and sample == 0 and error.startswith("AgentError: ")
    # The failed task keeps its place: pass^k is not taken over the others alone.
    assert summary.task_outcomes[d.tasks[1].id] == []
    with pytest.raises(turnrl.InvalidInputError, match="tasks have from 0 to 1 written episodes"):
        summary.pass_hat_k(1)
    assert len(list(turnrl.iter_rollout_records(out))) == 2


def test_cli_collect(chat_server, tmp_path, capsys):
    server, url = chat_server([], default="How can I help?")
    out = tmp_path / "c.jsonl"
    argv = [
        "rollouts",
        "collect",
        "--env",
        "synthetic:airline",
        "--tasks",
        "0:2",
        "--samples",
        "2",
        "--agent-model",
        "p",
        "--agent-url",
        url,
        "--user",
        "scripted",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 rollouts" in printed
    assert "pass^1 0.000, pass^2 0.000 (2 tasks x 2 episodes)" in printed
    assert all("chat_template_kwargs" not in body for _, body in server.requests)
    served = len(server.requests)
    assert main([*argv, "--no-thinking"]) == 0
    # The server renders the chat: it is told to leave thinking out.
    sent = [body for _, body in server.requests[served:]]
    assert sent and all(b["chat_template_kwargs"] == {"enable_thinking": False} for b in sent)
    assert len(list(turnrl.iter_rollout_records(out))) == 4
    # One episode per task: pass^1, as the README's "k = 1, 2, 4, ... up to that
    # number" and rollouts stats give it (it was left out).
    capsys.readouterr()
    samples = argv.index("--samples") + 1
    assert main([*argv[:samples], "1", *argv[samples + 1 :]]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 rollouts" in printed
    assert "pass^1 0.000 (2 tasks x 1 episode)" in printed
    assert main(["rollouts", "stats", str(out), "--quiet"]) == 0
    assert "pass^1 0.000" in capsys.readouterr().out
    # Not given, --top-p and --top-k are not sent (the server's defaults apply).
    assert all("top_p" not in b and "top_k" not in b for _, b in server.requests)
    served = len(server.requests)
    assert main([*argv, "--top-p", "0.95", "--top-k", "20", "--no-thinking"]) == 0
    sent = [body for _, body in server.requests[served:]]
    assert sent and all((b["top_p"], b["top_k"]) == (0.95, 20) for b in sent)
    assert all(b["chat_template_kwargs"] == {"enable_thinking": False} for b in sent)
    served = len(server.requests)
    assert main([*argv, "--top-k", "0"]) == 0  # off: the server's default overridden
    assert all(b["top_k"] == -1 for _, b in server.requests[served:])
    # Nor are --min-p and --repetition-penalty, until given (off values included).
    assert all("min_p" not in b and "repetition_penalty" not in b for _, b in server.requests)
    for (min_p, penalty), sent_as in (("0.05", "1.1"), (0.05, 1.1)), (("0", "1"), (0.0, 1.0)):
        served = len(server.requests)
        assert main([*argv, "--min-p", min_p, "--repetition-penalty", penalty]) == 0
        sent = [body for _, body in server.requests[served:]]
        assert sent and all((b["min_p"], b["repetition_penalty"]) == sent_as for b in sent)
    assert main([*argv[:-2], "--user", "llm", "--out", str(out)]) == 2
    assert "--user llm needs --user-model" in capsys.readouterr().err
    # A local folder as --agent-model, without --engine, is asked for by name at the
    # endpoint; when nothing comes back, the command says how to run it here instead.
    folder = tmp_path / "my-model"
    folder.mkdir()
    _, refusing = chat_server([(404, b'{"error": "model not found"}')] * 8)
    local = [*argv, "--agent-model", str(folder), "--agent-url", refusing]
    assert main(local) == 1
    err = capsys.readouterr().err
    assert f"--agent-model {folder} is a local path" in err and "add --engine" in err
    assert main([*local, "--agent-model", "remote-name"]) == 1
    assert "is a local path" not in capsys.readouterr().err


def test_cli_collect_runs_only_the_first_calls_per_message(chat_server, tmp_path, capsys):
    calls = [_call(f"c{i}", "calculate", {"expression": f"{i}+1"}) for i in range(3)]
    _, url = chat_server([{"content": "", "tool_calls": calls}], default="Anything else?")
    out = tmp_path / "first.jsonl"
    argv = [
        *("rollouts", "collect", "--env", "synthetic:airline", "--tasks", "0", "--samples", "1"),
        *("--agent-model", "p", "--agent-url", url, "--user", "scripted", "--workers", "1"),
        *("--quiet", "--out", str(out)),
    ]
    assert main([*argv, "--calls-per-message", "1"]) == 0
    printed = capsys.readouterr().out
    assert "2 tool calls not run (past --calls-per-message or a transfer)" in printed
    (record,) = turnrl.iter_rollout_records(out)
    first = record["turns"][1]
    assert first["tool_calls"] == [{"name": "calculate", "arguments": {"expression": "0+1"}}]
    assert first["tool_call_ids"] == ["c0"] and first["dropped_calls"] == 2
    assert [t["content"] for t in record["turns"] if t["role"] == "tool"] == ["1.0"]
    assert record["meta"]["dropped_calls"] == 2
    for bad, why in (("0", "must be at least 1"), ("x", "not an integer")):
        with pytest.raises(SystemExit):
            main([*argv, "--calls-per-message", bad])
        assert f"argument --calls-per-message: {why}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"calls_per_message": 0}, "calls_per_message must be"),
        ({"max_steps": 0}, "max_steps must be a positive integer, got 0"),
        ({"max_steps": 2.5}, "max_steps must be a positive integer, got 2.5"),
        # A tier the table lacks would fail every episode holding it (or count 0).
        (
            {"tiers": {"gold": 1.0, "read": 0.3, "write": 0.1, "error": -0.5}},
            r"^tiers: no reward for tier soft, respond \(the table has gold, read, write, "
            r"error; episodes are labelled gold, soft, read, write, error, respond\)$",
        ),
    ],
)
def test_collect_refuses_bad_episode_options_before_any_episode(tmp_path, option, message):
    d = envs.load("synthetic:airline", seed=0)
    made = []
    with pytest.raises(turnrl.InvalidInputError, match=message):
        collect_rollouts(
            d,
            lambda: made.append(1),
            envs.ScriptedUser,
            tmp_path / "none.jsonl",
            progress=False,
            **option,
        )
    assert made == [] and not (tmp_path / "none.jsonl").exists()


def test_cli_collect_refuses_a_tier_file_without_a_tier(tmp_path, capsys):
    tiers = tmp_path / "tiers.toml"
    tiers.write_text("[tiers]\ngold = 1.0\nsoft = 0.5\nread = 0.3\nwrite = 0.1\nerror = -0.5\n")
    out = tmp_path / "b.jsonl"
    argv = ["rollouts", "collect", "--env", "synthetic:airline", "--agent-model", "p"]
    argv += ["--agent-url", "http://127.0.0.1:9", "--user", "scripted", "--tiers", str(tiers)]
    assert main([*argv, "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: tiers {tiers}: no reward for tier respond (the table has gold," in err
    assert not out.exists()


def test_cli_collect_refuses_a_judge_url_without_a_judge_model(chat_server, tmp_path, capsys):
    """Without --judge-model no judge runs: a --judge-url alone was dropped unsaid,
    and tau2's natural-language assertions went unchecked in the outcomes."""
    server, url = chat_server([], default="How can I help?")
    out = tmp_path / "b.jsonl"
    argv = ["rollouts", "collect", "--env", "synthetic:airline", "--tasks", "0"]
    argv += ["--agent-model", "p", "--agent-url", url, "--user", "scripted", "--quiet"]
    assert main([*argv, "--judge-url", url, "--out", str(out)]) == 2
    assert "--judge-url is the judge's (--judge-model)" in capsys.readouterr().err
    assert server.requests == [] and not out.exists()


def test_cli_collect_refuses_a_negative_failure_limit_while_parsing(capsys):
    """0 is never; below it was refused by collect_rollouts in its own words
    ("max_consecutive_failures ... or None"), which the command line has not."""
    argv = ["rollouts", "collect", "--env", "synthetic:airline", "--agent-model", "p"]
    argv += ["--user", "scripted", "--out", "never.jsonl", "--max-consecutive-failures", "-1"]
    with pytest.raises(SystemExit):
        main(argv)
    assert "argument --max-consecutive-failures: must be at least 0, got '-1'" in (
        capsys.readouterr().err
    )


def test_think_text_stays_out_of_what_the_user_and_the_reward_see(chat_server):
    d = envs.load("synthetic:airline", seed=0)
    task = d.tasks[0]
    _, url = chat_server(["<think>the answer is 42</think>How can I help?"], default="Bye.")
    reply = envs.OpenAIAgent("p", url, api_key="k")([{"role": "user", "content": "hi"}], [])
    want = {
        "content": "How can I help?",
        "tool_calls": [],
        "reasoning": "the answer is 42",
        # What the policy generated, for training on it.
        "completion": "<think>the answer is 42</think>How can I help?",
    }
    assert reply == want
    _, url = chat_server(["<think>the answer is 42</think>How can I help?"], default="Bye.")
    rec = envs.run_episode(envs.OpenAIAgent("p", url, api_key="k"), d, task, envs.ScriptedUser())
    first = next(t for t in rec["turns"] if t["role"] == "assistant")
    assert first["content"] == "How can I help?" and first["reasoning"] == "the answer is 42"
    assert first["completion"] == want["completion"]
    with pytest.raises(turnrl.InvalidInputError, match="max_steps must be a positive integer"):
        envs.run_episode(envs.OpenAIAgent("p", url, api_key="k"), d, task, envs.ScriptedUser(), 0)


def _down_agent():
    agent = envs.OpenAIAgent("p", "http://127.0.0.1:9/v1", api_key="k", max_retries=0)
    return agent


def test_nothing_written_over_when_every_episode_fails(tmp_path):
    d = envs.load("synthetic:airline", seed=0)
    out = tmp_path / "kept.jsonl"
    out.write_text("old contents\n")
    summary = collect_rollouts(
        d, _down_agent, envs.ScriptedUser, out, tasks=d.tasks[:2], workers=1, progress=False
    )
    assert summary.records == 0 and len(summary.failures) == 2
    assert out.read_text() == "old contents\n"


def test_consecutive_failures_cancel_the_rest(tmp_path):
    d = envs.load("synthetic:airline", seed=0)
    summary = collect_rollouts(
        d,
        _down_agent,
        envs.ScriptedUser,
        tmp_path / "x.jsonl",
        tasks=d.tasks[:10],
        workers=1,
        max_consecutive_failures=3,
        progress=False,
    )
    assert summary.aborted == "3 episodes failed in a row"
    # The episode already running when the third failed may finish too.
    assert len(summary.failures) in (3, 4) and summary.records == 0


def test_a_summary_passed_again_says_how_the_latest_collection_ended(tmp_path):
    """``aborted`` is the latest collection's: a summary passed again after a
    run cancelled for failures in a row used to keep saying so after a run
    that ran every episode, and, already set, stopped the next run's own
    cancelling (every episode against a dead endpoint was tried)."""
    d = envs.load("synthetic:airline", seed=0)
    run = dict(workers=1, max_consecutive_failures=3, progress=False)
    summary = collect_rollouts(
        d, _down_agent, envs.ScriptedUser, tmp_path / "a.jsonl", tasks=d.tasks[:10], **run
    )
    assert summary.aborted == "3 episodes failed in a row"
    done = lambda: lambda messages, tools: {"content": "Done."}  # noqa: E731
    collect_rollouts(
        d, done, envs.ScriptedUser, tmp_path / "b.jsonl", tasks=d.tasks[:2], summary=summary, **run
    )
    assert summary.aborted is None and summary.records == 2
    failed = len(summary.failures)
    collect_rollouts(
        d,
        _down_agent,
        envs.ScriptedUser,
        tmp_path / "c.jsonl",
        tasks=d.tasks[:10],
        summary=summary,
        **run,
    )
    assert summary.aborted == "3 episodes failed in a row"
    assert len(summary.failures) - failed in (3, 4)


def _collect_interrupted_at_the_third_episode(chat_server, tmp_path):
    """Collect 8 episodes on one worker, with Ctrl-C arriving as the third
    starts: (domain, summary, buffer path, agents made)."""
    d = envs.load("synthetic:airline", seed=0)
    _, url = chat_server([], default="How can I help?")
    made = []

    def make_agent():
        made.append(1)
        if len(made) == 3:
            raise KeyboardInterrupt  # as if Ctrl-C arrived while the third episode ran
        return envs.OpenAIAgent("p", url, api_key="k")

    out = tmp_path / "partial.jsonl"
    summary = CollectSummary()
    with pytest.raises(KeyboardInterrupt):
        collect_rollouts(
            d,
            make_agent,
            envs.ScriptedUser,
            out,
            tasks=d.tasks[:8],
            workers=1,
            progress=False,
            summary=summary,
        )
    return d, summary, out, made


def test_an_interrupt_keeps_the_finished_episodes(chat_server, tmp_path):
    d, summary, out, made = _collect_interrupted_at_the_third_episode(chat_server, tmp_path)
    # The two before it are written, and the one already running when the
    # interrupt arrived, if it finished; the queued ones never start.
    assert summary.aborted == "interrupted" and summary.records in (2, 3)
    assert len(made) <= 4
    written = [r["task_id"] for r in turnrl.iter_rollout_records(out)]
    assert len(written) == summary.records and written[:2] == [t.id for t in d.tasks[:2]]


def test_cli_collect_names_the_failed_episodes_when_interrupted(tmp_path, monkeypatch, capsys):
    """Ctrl-C: the episodes that failed before it are named, as at a normal end
    (only the count of those written was said)."""
    import turnrl.collect

    def interrupted(*args, summary, **kwargs):
        summary.records = 1
        summary.failures.append(("synthetic/1", 0, "AgentError: endpoint down"))
        raise KeyboardInterrupt

    monkeypatch.setattr(turnrl.collect, "collect_rollouts", interrupted)
    out = tmp_path / "b.jsonl"
    argv = ["rollouts", "collect", "--env", "synthetic:airline", "--agent-model", "p"]
    argv += ["--agent-url", "http://127.0.0.1:9", "--user", "scripted", "--out", str(out)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert f"interrupted: 1 finished rollouts written to {out}" in err
    assert "failed: task synthetic/1 sample 0: AgentError: endpoint down" in err
    assert "1 episodes failed and were not written" in err


def test_a_second_interrupt_while_waiting_still_writes_the_finished_episodes(
    chat_server, tmp_path, monkeypatch
):
    """The first Ctrl-C waits for the running episodes; a second one there
    used to skip the write, losing every finished episode."""
    import turnrl.collect

    class SecondInterrupt(turnrl.collect.ThreadPoolExecutor):
        def shutdown(self, wait=True, *, cancel_futures=False):
            if wait and cancel_futures:  # the wait after the first interrupt
                super().shutdown(wait=False, cancel_futures=True)
                raise KeyboardInterrupt
            super().shutdown(wait=wait, cancel_futures=cancel_futures)

    monkeypatch.setattr(turnrl.collect, "ThreadPoolExecutor", SecondInterrupt)
    d, summary, out, _ = _collect_interrupted_at_the_third_episode(chat_server, tmp_path)
    assert summary.aborted == "interrupted" and summary.records >= 2
    written = [r["task_id"] for r in turnrl.iter_rollout_records(out)]
    assert len(written) == summary.records and written[:2] == [t.id for t in d.tasks[:2]]


@pytest.mark.parametrize("how", ["sigint", "raise"])
@pytest.mark.parametrize("where", ["before the write", "after the write"])
def test_an_interrupt_as_an_episode_is_written_keeps_it_once_and_counts_it(
    tmp_path, monkeypatch, where, how
):
    """Ctrl-C as the second finished episode is taken: it used to be marked
    taken before it was written (lost, when the interrupt came before the
    write) and counted after (the summary one short of the buffer, or the
    buffer dropped when it was the first)."""
    import signal

    import turnrl.collect
    import turnrl.rollouts

    calls = []

    def interrupt():
        if how == "sigint":
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does
        else:
            raise KeyboardInterrupt

    def on_second(real):
        def patched(*args):
            calls.append(1)
            if where == "after the write":
                real(*args)
            if len(calls) == 2:
                interrupt()
            return real(*args) if where == "before the write" else None

        return patched

    if where == "before the write":
        monkeypatch.setattr(
            turnrl.collect, "_without_token_ids", on_second(turnrl.collect._without_token_ids)
        )
    else:
        monkeypatch.setattr(
            turnrl.rollouts.RolloutWriter, "write", on_second(turnrl.rollouts.RolloutWriter.write)
        )
    d = envs.load("synthetic:airline", seed=0)
    out = tmp_path / "b.jsonl"
    summary = CollectSummary()
    with pytest.raises(KeyboardInterrupt):
        collect_rollouts(
            d,
            lambda: lambda messages, tools: {"content": "Done."},
            envs.ScriptedUser,
            out,
            tasks=d.tasks[:4],
            workers=1,
            progress=False,
            summary=summary,
        )
    assert summary.aborted == "interrupted"
    written = [r["task_id"] for r in turnrl.iter_rollout_records(out)]
    # The episode being written when the interrupt came is in the buffer once,
    # and the summary counts what the buffer holds.
    assert written[:2] == [t.id for t in d.tasks[:2]] and len(set(written)) == len(written)
    assert summary.records == len(written) == len(summary.outcomes)
    assert sum(map(len, summary.task_outcomes.values())) == len(written)


def _sigint_on(monkeypatch, method):
    """Ctrl-C (a real SIGINT) as ``RolloutWriter.<method>`` is first called."""
    import signal

    import turnrl.rollouts

    real = getattr(turnrl.rollouts.RolloutWriter, method)
    calls = []

    def patched(self, *args):
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)
        return real(self, *args)

    monkeypatch.setattr(turnrl.rollouts.RolloutWriter, method, patched)


def test_an_interrupt_as_the_finished_buffer_closes_loses_nothing(tmp_path, monkeypatch):
    """Ctrl-C during the final close, every episode written and counted: it
    still raises (a caller stops), but the summary says the run had ended,
    where it used to say "interrupted"."""
    _sigint_on(monkeypatch, "close")
    d = envs.load("synthetic:airline", seed=0)
    out = tmp_path / "b.jsonl"
    summary = CollectSummary()
    with pytest.raises(KeyboardInterrupt):
        collect_rollouts(
            d,
            lambda: lambda messages, tools: {"content": "Done."},
            envs.ScriptedUser,
            out,
            tasks=d.tasks[:3],
            workers=1,
            progress=False,
            summary=summary,
        )
    assert summary.finished and summary.aborted is None
    assert summary.records == len(list(turnrl.iter_rollout_records(out))) == 3


def test_an_interrupt_with_a_summary_that_finished_before_still_writes_what_finished(
    tmp_path, monkeypatch
):
    """A summary filled by an earlier collection that ended (``finished``) and
    passed again: a Ctrl-C while episodes remain used to be taken for one at
    the close, so the finished episodes were never written and the summary
    still said the run had ended."""
    d = envs.load("synthetic:airline", seed=0)
    agent = lambda: lambda messages, tools: {"content": "Done."}  # noqa: E731
    run = dict(tasks=d.tasks[:3], workers=1, progress=False)
    summary = collect_rollouts(d, agent, envs.ScriptedUser, tmp_path / "a.jsonl", **run)
    assert summary.finished
    _sigint_on(monkeypatch, "write")
    out = tmp_path / "b.jsonl"
    with pytest.raises(KeyboardInterrupt):
        collect_rollouts(d, agent, envs.ScriptedUser, out, **run, summary=summary)
    assert not summary.finished and summary.aborted == "interrupted"
    written = len(list(turnrl.iter_rollout_records(out)))
    assert written >= 1 and summary.records == 3 + written


@pytest.mark.parametrize(("method", "code"), [("close", 0), ("write", 130)])
def test_cli_collect_interrupted_at_the_close_succeeds_and_before_it_does_not(
    chat_server, tmp_path, monkeypatch, capsys, method, code
):
    """A Ctrl-C at the final close used to exit 130 "interrupted" with every
    episode written; one while episodes remain is still an interruption."""
    _, url = chat_server([], default="How can I help?")
    _sigint_on(monkeypatch, method)
    out = tmp_path / "c.jsonl"
    argv = ["rollouts", "collect", "--env", "synthetic:airline", "--tasks", "0:3", "--samples", "1"]
    argv += ["--agent-model", "p", "--agent-url", url, "--user", "scripted", "--workers", "1"]
    assert main([*argv, "--quiet", "--out", str(out)]) == code
    captured = capsys.readouterr()
    written = len(list(turnrl.iter_rollout_records(out)))
    if code == 0:
        assert written == 3 and "wrote 3 rollouts" in captured.out
        assert "interrupted after the collection ended: nothing was lost" in captured.err
    else:
        assert written < 3 and "wrote" not in captured.out
        assert f"interrupted: {written} finished rollouts written to {out}" in captured.err


def test_a_task_listed_twice_gets_twice_the_samples_in_one_group(tmp_path):
    d = envs.load("synthetic:airline", seed=0)
    out = tmp_path / "twice.jsonl"
    twice, once = d.tasks[0], d.tasks[1]
    collect_rollouts(
        d,
        lambda: lambda messages, tools: {"content": "Done."},
        envs.ScriptedUser,
        out,
        tasks=[twice, once, twice.id],
        samples=2,
        workers=2,
        progress=False,
    )
    pairs = sorted((r["group"], r["sample"]) for r in turnrl.iter_rollout_records(out))
    assert pairs == sorted([(twice.id, s) for s in range(4)] + [(once.id, s) for s in range(2)])


def test_group_prefix_keeps_runs_apart(chat_server, tmp_path):
    d = envs.load("synthetic:airline", seed=0)
    _, url = chat_server([], default="Hi.")
    out = tmp_path / "g.jsonl"
    collect_rollouts(
        d,
        lambda: envs.OpenAIAgent("p", url, api_key="k"),
        envs.ScriptedUser,
        out,
        tasks=d.tasks[:1],
        samples=2,
        group_prefix="step-0007/",
        progress=False,
    )
    groups = {r["group"] for r in turnrl.iter_rollout_records(out)}
    assert groups == {f"step-0007/{d.tasks[0].id}"}


def test_no_completion_is_kept_when_the_server_took_the_reasoning_out(chat_server):
    # vLLM's reasoning parser returns the reasoning apart: the content alone is
    # not what the model generated, so training falls back to the template.
    _, url = chat_server([{"content": "Done.", "reasoning_content": "plan"}, "Plain text."])
    agent = envs.OpenAIAgent("p", url, api_key="k")
    split = agent([{"role": "user", "content": "hi"}], [])
    assert split["reasoning"] == "plan" and split["content"] == "Done."
    assert "completion" not in split
    assert agent([{"role": "user", "content": "hi"}], [])["completion"] == "Plain text."


@settings(max_examples=50, deadline=None)
@given(
    tasks=st.integers(1, 6),
    episodes=st.integers(1, 8),
    data=st.data(),
)
def test_summary_pass_hat_k_is_tau_benchs(tasks, episodes, data):
    summary = CollectSummary()
    for t in range(tasks):
        outcomes = data.draw(
            st.lists(st.sampled_from([0.0, 1.0]), min_size=episodes, max_size=episodes)
        )
        summary.task_outcomes[f"task-{t}"] = outcomes
    for k in range(1, episodes + 1):
        # The chance that k of a task's episodes, drawn without replacement, all succeed.
        expected = (
            sum(
                math.comb(int(sum(outs)), k) / math.comb(episodes, k)
                for outs in summary.task_outcomes.values()
            )
            / tasks
        )
        assert summary.pass_hat_k(k) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(turnrl.InvalidInputError, match=r"k=.* must be in"):
        summary.pass_hat_k(episodes + 1)
    summary.task_outcomes["extra"] = [1.0] * (episodes + 1)
    with pytest.raises(turnrl.InvalidInputError, match=r"tasks have from .* written episodes"):
        summary.pass_hat_k(1)


# How servers refuse a chat longer than the model's context (HTTP 400): vLLM's
# first servers (serving_engine.py), its renderer (renderers/params.py), its
# current release's wording, its engine's own check (v1/engine/input_processor.py),
# and OpenAI's, with its code.
CONTEXT_REFUSALS = [
    {
        "message": "This model's maximum context length is 8192 tokens. However, you requested "
        "9000 tokens (8000 in the messages, 1000 in the completion). Please reduce the length "
        "of the messages or completion.",
        "type": "BadRequestError",
        "code": 400,
    },
    {
        "message": "You passed 8000 input tokens and requested 1000 output tokens. However, the "
        "model's context length is only 8192 tokens, resulting in a maximum input length of "
        "7192 tokens. Please reduce the length of the input prompt.",
        "type": "BadRequestError",
        "param": "input_tokens",
        "code": 400,
    },
    {
        "message": "This model's maximum context length is 8192 tokens. However, you requested "
        "1000 output tokens and your prompt contains at least 7193 input tokens, for a total of "
        "at least 8193 tokens. Please reduce the length of the input prompt or the number of "
        "requested output tokens. (parameter=input_tokens, value=7193)",
        "type": "BadRequestError",
        "param": "input_tokens",
        "code": 400,
    },
    {
        "message": "The decoder prompt (length 8200) is longer than the maximum model length of "
        "8192. Make sure that `max_model_len` is no smaller than the number of text tokens.",
        "type": "BadRequestError",
        "code": 400,
    },
    {
        "message": "Your input is too long for this model.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    },
]


@pytest.mark.parametrize("refusal", CONTEXT_REFUSALS)
def test_a_chat_the_context_cannot_hold_ends_the_episode_unretried(chat_server, refusal):
    refused = (400, json.dumps({"error": refusal}).encode())
    server, url = chat_server(["Let me check.", refused])

    class Asking:
        def reset(self, task):
            return "Hi."

        def step(self, message):
            return "Please go on."

    agent = envs.OpenAIAgent("p", url, api_key="k", max_retries=3, backoff=0.0)
    d = envs.load("synthetic:airline", seed=0)
    rec = envs.run_episode(agent, d, d.tasks[0], Asking())
    assert len(server.requests) == 2  # the refusal is not asked again
    assert rec["meta"]["stop_reason"] == "context_length" and rec["meta"]["steps"] == 1
    assert [t["role"] for t in rec["turns"]] == ["user", "assistant", "user"]
    _, url = chat_server([refused])
    with pytest.raises(envs.ContextLengthExceeded, match=r"answered HTTP 400") as e:
        envs.OpenAIAgent("p", url, api_key="k")([{"role": "user", "content": "hi"}], [])
    assert refusal["message"] in str(e.value)


@pytest.mark.parametrize(
    "message",
    [
        "max_tokens must be at least 1, got -186.",
        # A max_tokens the whole context could not hold, in vLLM's three
        # wordings: every episode would end at its first turn, quietly.
        "This model's maximum context length is 8192 tokens. However, you requested 9000 "
        "tokens (10 in the messages, 8990 in the completion). Please reduce the length of "
        "the messages or completion.",
        "You passed 10 input tokens and requested 8192 output tokens. However, the model's "
        "context length is only 8192 tokens, resulting in a maximum input length of 0 tokens.",
        "This model's maximum context length is 8192 tokens. However, you requested 10000 "
        "output tokens and your prompt contains at least 1 input tokens, for a total of at "
        "least 10001 tokens.",
    ],
)
def test_other_refusals_stay_agent_errors(chat_server, message):
    other = {"message": message, "code": 400}
    _, url = chat_server([(400, json.dumps({"error": other}).encode())])
    with pytest.raises(envs.AgentError, match="HTTP 400") as e:
        envs.OpenAIAgent("p", url, api_key="k")([{"role": "user", "content": "hi"}], [])
    assert not isinstance(e.value, envs.ContextLengthExceeded)
    assert message in str(e.value)


def test_collect_counts_episodes_the_context_ended(chat_server, tmp_path, capsys):
    refused = (400, json.dumps({"error": CONTEXT_REFUSALS[2]}).encode())
    _, url = chat_server([refused] * 4)
    out = tmp_path / "ctx.jsonl"
    argv = ["rollouts", "collect", "--env", "synthetic:airline", "--tasks", "0:2"]
    argv += ["--samples", "2", "--agent-model", "p", "--agent-url", url, "--user", "scripted"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 rollouts" in printed and "stops: context_length 4" in printed
    # Refused at the first request, no episode has a turn (it read "by tier: " and no more).
    assert "stops: context_length 4; no assistant turns\n" in printed
    records = list(turnrl.iter_rollout_records(out))
    assert [r["meta"]["stop_reason"] for r in records] == ["context_length"] * 4


def test_cli_train_refuses_a_tier_file_without_a_tier_before_the_model_loads(tmp_path, capsys):
    tiers = tmp_path / "tiers.toml"
    tiers.write_text("[tiers]\ngold = 1.0\nsoft = 0.5\nread = 0.3\nwrite = 0.1\nerror = -0.5\n")
    # No such model: loading it would fail with another message.
    argv = ["train", "--model", str(tmp_path / "no-model"), "--env", "synthetic:airline"]
    argv += ["--out", str(tmp_path / "run"), "--user", "scripted", "--tiers", str(tiers)]
    assert main(argv) == 2
    assert f"error: tiers {tiers}: no reward for tier respond (the table has gold," in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "run" / "adapter").exists()

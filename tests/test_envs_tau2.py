"""tau2-bench domains on the shared data."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from turnrl import envs

SHARED = Path(__file__).parents[1].parent / "shared"
TAU2 = SHARED / "tau2-bench"
pytestmark = pytest.mark.skipif(
    not (TAU2 / "data" / "tau2").is_dir(), reason=f"tau2-bench data not found at {TAU2}"
)

SIZES = {("airline", "train"): 30, ("airline", "test"): 20, ("airline", "base"): 50}


@pytest.mark.parametrize("domain_name", ["airline", "retail"])
@pytest.mark.parametrize("split", ["train", "test", "base"])
def test_gold_replays_score_one_and_talking_scores_zero(domain_name, split):
    d = envs.load(f"tau2:{domain_name}", root=TAU2, split=split)
    if (domain_name, split) in SIZES:
        assert len(d.tasks) == SIZES[(domain_name, split)]
    writes = 0
    for task in d.tasks:
        ep = d.new_episode(task)
        for a in task.actions:
            obs = ep.call(a.name, a.kwargs)
            if domain_name == "airline":
                assert not obs.startswith("Error"), (task.id, a.name, obs)
        for info in task.communicate_info:
            ep.say(f"FYI: {info}")
        assert ep.reward().reward == 1.0, task.id
        talker = d.new_episode(task)
        talker.say(" ".join(task.communicate_info))
        if not d.replay(task)[0].same_as(talker.store):
            writes += 1
            assert talker.reward().reward == 0.0
    assert writes > 0


def _mia_booking(d):
    flight = d.tables["flights"]["HAT136"]["dates"]["2024-05-20"]
    user = d.tables["users"]["mia_li_3668"]
    card = next(k for k, v in user["payment_methods"].items() if v["source"] == "credit_card")
    return {
        "user_id": "mia_li_3668",
        "origin": "JFK",
        "destination": "SEA",
        "flight_type": "one_way",
        "cabin": "economy",
        "flights": [{"flight_number": "HAT136", "date": "2024-05-20"}],
        "passengers": [{"first_name": "Mia", "last_name": "Li", "dob": "1990-04-05"}],
        "payment_methods": [{"payment_id": card, "amount": flight["prices"]["economy"]}],
        "total_baggages": 0,
        "nonfree_baggages": 0,
        "insurance": "no",
    }


def test_tau2_airline_fixes():
    d = envs.load("tau2:airline", root=TAU2, split="base")
    assert "think" not in d.tool_kinds and d.tool_kinds["get_flight_status"] == "read"
    ep = d.new_episode(0)
    assert ep.call("get_user_details", {"user_id": "x"}) == "Error: User x not found"
    assert ep.call("cancel_reservation", {"reservation_id": "X"}) == (
        "Error: Reservation X not found"
    )
    assert ep.call("get_flight_status", {"flight_number": "HAT001", "date": "2024-05-01"}) == (
        "landed"
    )
    assert ep.call("calculate", {"expression": "a"}) == "Error: Invalid characters in expression"
    assert ep.call("nope", {}) == "Error: Tool 'nope' not found."
    # booking takes seats off the flight
    flight = d.tables["flights"]["HAT136"]["dates"]["2024-05-20"]
    seats = flight["available_seats"]["economy"]
    user = d.tables["users"]["mia_li_3668"]
    cert = next(k for k, v in user["payment_methods"].items() if v["source"] == "certificate")
    card = next(k for k, v in user["payment_methods"].items() if v["source"] == "credit_card")
    out = ep.call("book_reservation", _mia_booking(d))
    assert json.loads(out)["reservation_id"] == "HATHAT", out
    booked = ep.store.get("flights", "HAT136")["dates"]["2024-05-20"]
    assert booked["available_seats"]["economy"] == seats - 1
    assert (
        d.tables["flights"]["HAT136"]["dates"]["2024-05-20"]["available_seats"]["economy"] == seats
    )
    # a flight change also sets the cabin
    res = json.loads(
        ep.call(
            "update_reservation_flights",
            {
                "reservation_id": "HATHAT",
                "cabin": "business",
                "flights": [{"flight_number": "HAT136", "date": "2024-05-20"}],
                "payment_id": card,
            },
        )
    )
    assert res["cabin"] == "business"
    assert ep.call(
        "update_reservation_baggages",
        {
            "reservation_id": "HATHAT",
            "total_baggages": 1,
            "nonfree_baggages": 1,
            "payment_id": cert,
        },
    ) == ("Error: Certificate cannot be used to update reservation")


def test_tau2_retail_semantics():
    d = envs.load("tau2:retail", root=TAU2, split="test")
    kinds = d.tool_kinds
    assert "think" not in kinds and kinds["get_item_details"] == "read"
    ep = d.new_episode(0)
    assert ep.call("get_order_details", {"order_id": "#W0"}) == "Error: Order not found"
    assert ep.call("find_user_id_by_email", {"email": "no@x"}) == "Error: User not found"
    product = next(iter(d.tables["products"].values()))
    item_id, variant = next(iter(product["variants"].items()))
    assert json.loads(ep.call("get_item_details", {"item_id": item_id})) == variant
    assert isinstance(variant["price"], float)  # tau2's model types prices as floats
    pending = next(k for k, o in d.tables["orders"].items() if o["status"] == "pending")
    order = d.tables["orders"][pending]
    same = order["items"][0]["item_id"]
    assert (
        ep.call(
            "modify_pending_order_items",
            {
                "order_id": pending,
                "item_ids": [same],
                "new_item_ids": [same],
                "payment_method_id": order["payment_history"][0]["payment_method_id"],
            },
        )
        == "Error: The new item id should be different from the old item id"
    )
    assert order["cancel_reason"] is None  # optional fields present, as tau2 dumps them
    out = json.loads(
        ep.call(
            "modify_pending_order_address",
            {
                "order_id": pending,
                "address1": "1 A St",
                "address2": "",
                "city": "X",
                "state": "NY",
                "country": "USA",
                "zip": "10001",
            },
        )
    )
    assert list(out["address"]) == ["address1", "address2", "city", "country", "state", "zip"]


def test_tau2_airline_booking_validates_like_tau2s_models():
    """Upstream's Reservation model checks every field at once, lists included."""
    d = envs.load("tau2:airline", root=TAU2, split="base")
    args = _mia_booking(d)
    ep = d.new_episode(0)
    # passengers that are not objects are refused (tau2 validates List[Passenger])
    out = ep.call("book_reservation", {**args, "passengers": ["Mia Li"]})
    assert out == (
        "Error: 1 validation error for Reservation\npassengers.0\n  Input should be a valid "
        "dictionary or instance of Passenger [type=model_type, input_value='Mia Li', "
        "input_type=str]\n    For further information visit "
        "https://errors.pydantic.dev/2.12/v/model_type"
    )
    assert not ep.store.has("reservations", "HATHAT")
    out = ep.call("book_reservation", {**args, "payment_methods": "abc", "total_baggages": 2.5})
    assert out.startswith("Error: 2 validation errors for Reservation\npayment_history\n")
    assert "got a number with a fractional part [type=int_from_float" in out
    # pydantic's lax int: "1.0" is 1
    booked = json.loads(ep.call("book_reservation", {**args, "total_baggages": "1.0"}))
    assert booked["total_baggages"] == 1
    # a list tau2 leaves unconverted fails on the attribute read
    assert ep.call("book_reservation", {**args, "flights": "HAT136"}) == (
        "Error: 'str' object has no attribute 'flight_number'"
    )
    long = "x" * 60
    assert f"input_value='{'x' * 24}...{'x' * 23}'," in ep.call(
        "send_certificate", {"user_id": "mia_li_3668", "amount": long}
    )
    assert ep.call("calculate", {"expression": []}) == (
        "Error: eval() arg 1 must be a string, bytes or code object"
    )


def test_tau2_retail_address_reports_every_field():
    d = envs.load("tau2:retail", root=TAU2, split="test")
    ep = d.new_episode(0)
    user = next(iter(d.tables["users"]))
    out = ep.call(
        "modify_user_address",
        {
            "user_id": user,
            "address1": 7,
            "address2": "",
            "city": "X",
            "state": None,
            "country": "USA",
            "zip": "1",
        },
    )
    assert out.startswith("Error: 2 validation errors for UserAddress\naddress1\n"), out
    assert "\nstate\n  Input should be a valid string [type=string_type" in out


def test_text_sent_with_tool_calls_counts_for_the_communicate_check():
    # tau2-bench's communicate check reads every assistant message with text,
    # those that also call tools included (tau-bench v1 reads respond actions
    # only, tests/test_envs_taubench.py).
    d = envs.load("tau2:airline", root=TAU2, split="base")
    task = next(t for t in d.tasks if t.communicate_info and "COMMUNICATE" in t.reward_basis)
    script = [
        {
            "content": "Note: " + ", ".join(task.communicate_info),
            "tool_calls": [{"name": a.name, "arguments": a.kwargs} for a in task.actions],
        },
        {"content": "Is there anything else?"},
    ]

    def agent(messages, tools):
        return script.pop(0) if script else {"content": "Goodbye."}

    record = envs.run_episode(agent, d, task, envs.ScriptedUser())
    assert record["outcome"] == 1.0, record["meta"]
    ep = d.new_episode(task)
    for a in task.actions:
        ep.call(a.name, a.kwargs)
    assert ep.reward().reward == 0.0  # nothing communicated
    ep.say_with_calls(" ".join(task.communicate_info))
    assert ep.reward().reward == 1.0
    v1 = envs.load("synthetic:airline", seed=0).new_episode(0)
    v1.say_with_calls("anything")
    assert v1.agent_messages == []


def test_a_transfer_is_a_tool_call_and_the_user_ends_the_episode():
    """tau2-bench's orchestrator does not stop at transfer_to_human_agents:
    the user simulator says ###TRANSFER### after it (tau-bench v1 stops)."""
    d = envs.load("tau2:airline", root=TAU2, split="base")
    task = d.tasks[0]
    script = [
        {"tool_calls": [{"name": "transfer_to_human_agents", "arguments": {"summary": "s"}}]},
        {"content": "You are being transferred to a human agent."},
    ]

    class TransferredUser(envs.ScriptedUser):
        def step(self, agent_message):
            return "###TRANSFER###"

    record = envs.run_episode(lambda m, t: script.pop(0), d, task, TransferredUser())
    assert record["meta"]["stop_reason"] == "user_stop"
    roles = [turn["role"] for turn in record["turns"]]
    assert roles == ["user", "assistant", "tool", "assistant", "user"]
    assert record["meta"]["steps"] == 5 and record["meta"]["tool_errors"] == 0


# --- what the agent is shown: tau2's system prompt and the orchestrator's greeting


def _recording_agent(task):
    """Looks the user up, then answers: (agent, the chats it was sent)."""
    sent: list[list[dict]] = []

    def agent(messages, tools):
        sent.append(copy.deepcopy(list(messages)))
        if len(sent) == 1:
            return {"tool_calls": [{"name": "get_user_details", "arguments": {"user_id": "x"}}]}
        return {"content": "Anything else?"}

    return agent, sent


def test_a_tau2_agent_is_shown_tau2s_prompt_and_greeting_and_training_renders_them(tok):
    from turnrl.envs import tau2
    from turnrl.train import rollout_messages, template_messages, tokenize_rollout

    d = envs.load("tau2:airline", root=TAU2, split="test")
    # The shared copy holds tau2's data only: turnrl's own instruction text.
    assert not (TAU2 / tau2.AGENT_SOURCE).exists()
    assert d.system_prompt == (
        f"<instructions>\n{tau2.BUILTIN_AGENT_INSTRUCTION}\n</instructions>\n"
        f"<policy>\n{d.policy}\n</policy>"
    )
    greeting = "Hi! How can I help you today?"
    assert d.rules.greeting == greeting
    task = d.tasks[0]
    agent, sent = _recording_agent(task)
    user = envs.ScriptedUser(max_replies=1)
    record = envs.run_episode(agent, d, task, user)
    opening = record["turns"][0]
    assert opening["role"] == "user"
    assert sent[0] == [
        {"role": "system", "content": d.system_prompt},
        {"role": "assistant", "content": greeting},
        {"role": "user", "content": opening["content"]},
    ]
    # No turn of the record: the agent's two messages are its only turns, and
    # tau2 counts no step for the greeting: the opening, the call, its run,
    # the reply and the user's stop are five.
    assert [t["role"] for t in record["turns"]] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
    ]
    assert record["meta"]["steps"] == 5 and record["meta"]["stop_reason"] == "user_stop"

    rebuilt = rollout_messages(record, d.system_prompt, d.rules.greeting)
    for chat in sent:
        assert template_messages(rebuilt[: len(chat)]) == template_messages(chat)
    tokens = tokenize_rollout(
        record,
        tok,
        system=d.system_prompt,
        greeting=d.rules.greeting,
        tools=d.openai_tools(),
        pack="never",
    )
    assert len(tokens.input_ids) == 2  # one row per assistant turn, none for the greeting
    for ids, owner in zip(tokens.input_ids, tokens.token_turn, strict=True):
        prompt = tok.decode([i for i, o in zip(ids, owner, strict=True) if o < 0])
        trained = tok.decode([i for i, o in zip(ids, owner, strict=True) if o >= 0])
        assert greeting in prompt and greeting not in trained
        assert prompt.index("<instructions>") < prompt.index(greeting)
        assert prompt.index(greeting) < prompt.index(opening["content"])


@pytest.mark.parametrize("pack", ["never", "exact", "rendered"])
def test_build_batch_renders_the_greeting_in_every_prompt(tok, pack):
    from turnrl.train import build_batch

    d = envs.load("tau2:retail", root=TAU2, split="test")
    task = d.tasks[0]
    agent, _ = _recording_agent(task)
    record = envs.run_episode(agent, d, task, envs.ScriptedUser(max_replies=1))
    batch = build_batch(
        [record],
        tok,
        system=d.system_prompt,
        greeting=lambda r: d.rules.greeting,
        tools=d.openai_tools(),
        pack=pack,
    )
    for row, mask in zip(batch.input_ids.tolist(), batch.loss_mask.tolist(), strict=True):
        prompt = tok.decode([i for i, m in zip(row, mask, strict=True) if not m])
        trained = tok.decode([i for i, m in zip(row, mask, strict=True) if m])
        assert prompt.count(d.rules.greeting) == 1 and d.rules.greeting not in trained
        assert trained.count("<|im_end|>") == (1 if pack == "never" else 2)
    # Both replies are trained, in a row each or packed in one (the greeting is
    # no turn: exact packing finds each reply's context to be its prompt).
    assert int(batch.loss_mask.any(dim=1).sum()) == (2 if pack == "never" else 1)


def _checkout_with_agent_source(tmp_path, source):
    """A tau2-bench checkout: the shared data beside a planted agent module."""
    (tmp_path / "data").symlink_to(TAU2 / "data")
    agent_dir = tmp_path / "src" / "tau2" / "agent"
    agent_dir.mkdir(parents=True)
    (agent_dir / "llm_agent.py").write_text(source)
    return tmp_path


def test_a_checkouts_agent_prompt_is_read_not_executed(tmp_path):
    marker = tmp_path / "RAN"
    root = _checkout_with_agent_source(
        tmp_path,
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        'AGENT_INSTRUCTION = """\nPlanted instruction {not a field}.\n""".strip()\n'
        "SYSTEM_PROMPT: str = '''\n<rules>\n{agent_instruction}\n</rules>\n"
        "{domain_policy}\n{{literal}}\n'''.strip()\n",
    )
    d = envs.load("tau2:airline", root=root, split="test")
    assert d.system_prompt == (
        f"<rules>\nPlanted instruction {{not a field}}.\n</rules>\n{d.policy}\n{{literal}}"
    )
    assert not marker.exists()
    # A checkout laid out otherwise: its data loads, and the agent gets the
    # built-in instructions, with a warning naming the file and the line.
    builtin = envs.load("tau2:airline", root=TAU2, split="test").system_prompt
    source = root / "src" / "tau2" / "agent" / "llm_agent.py"
    for text, warned in [
        (
            "AGENT_INSTRUCTION = make()\nSYSTEM_PROMPT = '{agent_instruction}'\n",
            r"llm_agent.py:1: AGENT_INSTRUCTION is not a string literal",
        ),
        ("SYSTEM_PROMPT = 'x'\n", r"llm_agent.py: no module-level AGENT_INSTRUCTION"),
        (
            "AGENT_INSTRUCTION = 'a'\nSYSTEM_PROMPT = '{agent_instruction} {other}'\n",
            r"SYSTEM_PROMPT is not a template of",
        ),
        ("AGENT_INSTRUCTION = (\n", r"llm_agent.py:1: not valid Python"),
    ]:
        source.write_text(text)
        with pytest.warns(UserWarning, match=warned + r".*built-in tau2 instructions instead"):
            d = envs.load("tau2:airline", root=root, split="test")
        assert d.system_prompt == builtin
        assert d.tasks and d.tools


def test_tau_bench_agents_see_the_policy_alone_and_no_greeting():
    if (SHARED / "tau-bench" / "tau_bench").is_dir():
        wiki = envs.load("taubench:airline", root=SHARED / "tau-bench")
        assert wiki.system_prompt == wiki.policy and wiki.rules.greeting is None
    d = envs.load("synthetic:airline", seed=0)
    assert d.system_prompt == d.policy and d.rules.greeting is None
    task = d.tasks[0]
    agent, sent = _recording_agent(task)
    record = envs.run_episode(agent, d, task, envs.ScriptedUser(max_replies=1))
    assert sent[0] == [
        {"role": "system", "content": d.policy},
        {"role": "user", "content": record["turns"][0]["content"]},
    ]


@pytest.mark.parametrize("opening", ["###STOP###", "ok ###TRANSFER###", "###OUT-OF-SCOPE###"])
def test_tau2_ends_an_episode_the_users_opening_stops(opening):
    class Stopping:
        def reset(self, task):
            return opening

        def step(self, message):
            raise AssertionError("the user is not asked again")

    def agent(messages, tools):
        raise AssertionError("the agent is not asked")

    d = envs.load("tau2:airline", root=TAU2, split="test")
    rec = envs.run_episode(agent, d, 0, Stopping())
    assert rec["turns"] == [{"role": "user", "content": opening}]
    assert rec["meta"]["stop_reason"] == "user_stop" and rec["meta"]["steps"] == 1


@pytest.mark.parametrize("domain_name", ["airline", "retail"])
def test_an_argument_named_data_is_just_unknown_to_tau2(domain_name):
    # tau2-bench has no data keyword of its own (tau-bench's invoke has).
    d = envs.load(f"tau2:{domain_name}", root=TAU2, split="base")
    ep = d.new_episode(0)
    tools = "AirlineTools" if domain_name == "airline" else "RetailTools"
    assert ep.call("get_user_details", {"user_id": "x", "data": {}}) == (
        f"Error: {tools}.get_user_details() got an unexpected keyword argument 'data'"
    )


@pytest.mark.parametrize("domain_name", ["airline", "retail"])
def test_arguments_named_like_make_tool_call_s_own_fail_there(domain_name):
    # tau2-bench runs env.make_tool_call(name, requestor=..., **arguments):
    # "requestor" clashes at the call (wherever it is), "self" and "tool_name"
    # with its parameters (the first in order), before the tool is reached.
    d = envs.load(f"tau2:{domain_name}", root=TAU2, split="base")
    ep = d.new_episode(0)
    requestor = (
        "Error: tau2.environment.environment.Environment.make_tool_call() "
        "got multiple values for keyword argument 'requestor'"
    )
    assert ep.call("get_user_details", {"user_id": "x", "requestor": "user"}) == requestor
    assert ep.call("get_user_details", {"self": 1, "zip": 2, "requestor": 3}) == requestor
    assert ep.call("get_user_details", {"user_id": "x", "self": 1}) == (
        "Error: Environment.make_tool_call() got multiple values for argument 'self'"
    )
    assert ep.call("calculate", {"zip": 1, "tool_name": "x", "self": 1}) == (
        "Error: Environment.make_tool_call() got multiple values for argument 'tool_name'"
    )
    assert ep.last_error and ep.store.overlay == {}


def test_a_baggage_payment_is_a_whole_amount_as_tau2_s_payment_model_makes_it():
    d = envs.load("tau2:airline", root=TAU2, split="base")
    ep = d.new_episode(0)
    rid, gift_card = "4WQ150", "gift_card_3576581"  # no paid bags, $245 on the card
    bags = {"reservation_id": rid, "total_baggages": 6, "payment_id": gift_card}
    obs = json.loads(ep.call("update_reservation_baggages", {**bags, "nonfree_baggages": 1.0}))
    assert obs["payment_history"][-1] == {"payment_id": gift_card, "amount": 50}
    assert type(obs["payment_history"][-1]["amount"]) is int and obs["nonfree_baggages"] == 1.0
    # A fractional total fails in the Payment model, after the card was charged.
    assert ep.call("update_reservation_baggages", {**bags, "nonfree_baggages": 1.01}) == (
        "Error: 1 validation error for Payment\n"
        "amount\n"
        "  Input should be a valid integer, got a number with a fractional part "
        "[type=int_from_float, input_value=0.5000000000000004, input_type=float]\n"
        "    For further information visit https://errors.pydantic.dev/2.12/v/int_from_float"
    )
    assert (
        ep.store.get("users", "chen_jackson_3290")["payment_methods"][gift_card]["amount"] == 194.5
    )
    assert ep.store.get("reservations", rid)["nonfree_baggages"] == 1.0
    assert len(ep.store.get("reservations", rid)["payment_history"]) == 2


def test_tau2_retail_schemas_type_a_cancel_reason_as_tau2_does():
    # tau2's cancel_pending_order takes any string and refuses other reasons
    # itself (tau-bench's schema had an enum); the schema must not narrow it.
    d = envs.load("tau2:retail", root=TAU2, split="base")
    schema = next(t for t in d.tools if t["function"]["name"] == "cancel_pending_order")
    reason = schema["function"]["parameters"]["properties"]["reason"]
    assert reason["type"] == "string" and "enum" not in reason
    assert "'no longer needed'" in reason["description"]
    assert "'ordered by mistake'" in reason["description"]
    ep = d.new_episode(0)
    assert ep.call("cancel_pending_order", {"order_id": "#W2611340", "reason": "x"}) == (
        "Error: Non-pending order cannot be cancelled"
    )


# The user simulator: what tau2-bench's own is shown. Two planted tasks with
# the scenario rendered by hand as tau2 renders it (str(task.user_scenario)):
# a persona, structured instructions (a null unknown_info left out, every
# line of a field indented by a tab under its title, blank lines kept bare),
# and plain-string instructions.
_SCENARIOS = [
    {
        "id": "s1",
        "user_scenario": {
            "persona": "Patient; speaks briefly.",
            "instructions": {
                "domain": "airline",
                "reason_for_call": "Cancel reservation ABC123.\n\nIt was booked last week.",
                "known_info": "You are Ann Lee.\nYour user id is ann_lee_1.",
                "unknown_info": None,
                "task_instructions": "Ask for a refund.\n\nStop once it is cancelled.",
            },
        },
        "evaluation_criteria": {"actions": [], "reward_basis": ["DB"]},
    },
    {
        "id": "s2",
        "user_scenario": {
            "persona": None,
            "instructions": "You are Bob (user id bob_2).\nAsk which flights leave tomorrow.",
        },
        "evaluation_criteria": {"actions": [], "reward_basis": ["DB"]},
    },
]
_RENDERED = {
    "s1": (
        "Persona:\n"
        "\tPatient; speaks briefly.\n"
        "Instructions:\n"
        "\tDomain: airline\n"
        "\tReason for call:\n"
        "\t\tCancel reservation ABC123.\n"
        "\n"
        "\t\tIt was booked last week.\n"
        "\tKnown info:\n"
        "\t\tYou are Ann Lee.\n"
        "\t\tYour user id is ann_lee_1.\n"
        "\tTask instructions:\n"
        "\t\tAsk for a refund.\n"
        "\n"
        "\t\tStop once it is cancelled."
    ),
    "s2": "Instructions:\n\tYou are Bob (user id bob_2).\n\tAsk which flights leave tomorrow.",
}


def _checkout_with_tasks(tmp_path, tasks, guidelines=None):
    """A tau2-bench checkout: the shared airline data with ``tasks`` in a
    ``test`` split, and ``guidelines`` (text or bytes) as its user simulator's
    guidelines file when given."""
    base = tmp_path / "data" / "tau2" / "domains" / "airline"
    base.mkdir(parents=True)
    for name in ("db.json", "policy.md"):
        (base / name).symlink_to(TAU2 / "data" / "tau2" / "domains" / "airline" / name)
    (base / "tasks.json").write_text(json.dumps(tasks))
    (base / "split_tasks.json").write_text(json.dumps({"test": [t["id"] for t in tasks]}))
    if guidelines is not None:
        path = tmp_path / "data" / "tau2" / "user_simulator" / "simulation_guidelines.md"
        path.parent.mkdir(parents=True)
        if isinstance(guidelines, bytes):
            path.write_bytes(guidelines)
        else:
            path.write_text(guidelines)
    return tmp_path


def _talking_agent(sent):
    """Looks the user up with a word to it (hidden from the user: a message
    with calls goes to the tools), then asks a question, then says it is done."""

    def agent(messages, tools):
        sent.append(copy.deepcopy(list(messages)))
        if len(sent) == 1:
            return {
                "content": "Let me look you up.",
                "tool_calls": [{"name": "get_user_details", "arguments": {"user_id": "x"}}],
            }
        return {"content": "Which reservation?" if len(sent) == 2 else "It is cancelled."}

    return agent


@pytest.mark.parametrize("task_id", ["s1", "s2"])
@pytest.mark.parametrize("planted", [True, False])
def test_a_tau2_llm_user_is_shown_tau2s_guidelines_then_the_scenario(
    tmp_path, chat_server, task_id, planted
):
    pytest.importorskip("openai")
    from turnrl.envs import users

    # A full checkout's own guidelines file, read as text (tau2's place for a
    # runtime persona's guidelines emptied, as its default persona leaves it);
    # a data-only copy gets turnrl's wording of the same guidelines.
    planted_text = "# Planted guidelines\nEnd with ###STOP###.\n<PERSONA_GUIDELINES>\n"
    root = _checkout_with_tasks(tmp_path, _SCENARIOS, planted_text if planted else None)
    guidelines = "# Planted guidelines\nEnd with ###STOP###.\n\n" if planted else None
    if not planted:
        guidelines = users.TAU2_USER_GUIDELINES
        for token in ("###STOP###", "###TRANSFER###", "###OUT-OF-SCOPE###"):
            assert token in guidelines
    d = envs.load("tau2:airline", root=root, split="test")
    task = d.task(f"airline/test/{task_id}")
    scenario = _RENDERED[task_id]
    assert task.instruction == scenario
    system = f"{guidelines}\n\n<scenario>\n{scenario}\n</scenario>"
    assert task.user_system_prompt == system

    srv, url = chat_server(["Hi, I need to cancel a trip.", "ABC123.", "###STOP###"])
    sent = []
    user = envs.LLMUser("sim", url, api_key="k")
    record = envs.run_episode(_talking_agent(sent), d, task, user)
    assert record["meta"]["stop_reason"] == "user_stop"
    # The user sees the greeting as the first "user" message, then the agent's
    # text-only messages as "user" messages and its own replies as "assistant"
    # ones; the message with a tool call (and its words) never reaches it.
    greeting = {"role": "user", "content": "Hi! How can I help you today?"}
    chats = [body["messages"] for _, body in srv.requests]
    assert chats == [
        [{"role": "system", "content": system}, greeting],
        [
            {"role": "system", "content": system},
            greeting,
            {"role": "assistant", "content": "Hi, I need to cancel a trip."},
            {"role": "user", "content": "Which reservation?"},
        ],
        [
            {"role": "system", "content": system},
            greeting,
            {"role": "assistant", "content": "Hi, I need to cancel a trip."},
            {"role": "user", "content": "Which reservation?"},
            {"role": "assistant", "content": "ABC123."},
            {"role": "user", "content": "It is cancelled."},
        ],
    ]
    # A prompt of one's own still gets the task's instruction (here the
    # rendered scenario) in place of {instruction}, and nothing else.
    _, url = chat_server(["Hi."])
    own = envs.LLMUser("sim", url, api_key="k", system_prompt="Play: {instruction} {{x}}")
    own.reset(task)
    assert own.messages[0] == {"role": "system", "content": f"Play: {scenario} {{{{x}}}}"}
    # turnrl's tau2 template is the built-in guidelines in the same layout.
    tau2_own = envs.LLMUser("sim", url, api_key="k", system_prompt=users.TAU2_SYSTEM_PROMPT)
    tau2_own.reset(task)
    assert tau2_own.messages[0]["content"] == (
        f"{users.TAU2_USER_GUIDELINES}\n\n<scenario>\n{scenario}\n</scenario>"
    )


def test_a_guidelines_file_with_crlf_and_a_bom_reads_as_tau2_reads_it(tmp_path):
    # tau2 reads the file with open(path, "r"): line ends become "\n", and a
    # UTF-8 byte-order mark stays, as a character; the user is shown the same.
    raw = "\ufeff# Guidelines\r\nSay ###STOP###.\r\n<PERSONA_GUIDELINES>\r\n".encode()
    root = _checkout_with_tasks(tmp_path, _SCENARIOS, raw)
    path = root / "data" / "tau2" / "user_simulator" / "simulation_guidelines.md"
    with open(path, encoding="utf-8") as file:  # tau2's read (UTF-8 is its locale's here)
        tau2_text = file.read().replace("<PERSONA_GUIDELINES>", "")
    assert tau2_text == "\ufeff# Guidelines\nSay ###STOP###.\n\n"
    task = envs.load("tau2:airline", root=root, split="test").task("airline/test/s2")
    assert task.user_system_prompt == (f"{tau2_text}\n\n<scenario>\n{_RENDERED['s2']}\n</scenario>")


@pytest.mark.parametrize(
    ("plant", "why"),
    [
        ("bytes", r"cannot be read as text \(UnicodeDecodeError"),
        ("folder", r"cannot be read as text \(IsADirectoryError"),
    ],
)
def test_an_unreadable_user_guidelines_file_warns_and_the_builtin_text_is_shown(
    tmp_path, plant, why
):
    from turnrl.envs import users

    root = _checkout_with_tasks(
        tmp_path, _SCENARIOS, b"\xff\xfe not utf-8" if plant == "bytes" else None
    )
    if plant == "folder":
        (root / "data" / "tau2" / "user_simulator" / "simulation_guidelines.md").mkdir(parents=True)
    with pytest.warns(
        UserWarning,
        match=r"simulation_guidelines\.md: "
        + why
        + r".*the user simulator is shown turnrl's built-in tau2 guidelines instead",
    ):
        d = envs.load("tau2:airline", root=root, split="test")
    for task in d.tasks:
        assert task.user_system_prompt == (
            f"{users.TAU2_USER_GUIDELINES}\n\n<scenario>\n{task.instruction}\n</scenario>"
        )


@pytest.mark.parametrize(
    ("scenario", "said"),
    [
        ({"instructions": 3}, r"instructions must be text or an object"),
        (
            {"instructions": {"domain": "airline", "reason_for_call": "r"}},
            r"instructions\.task_instructions must be text, got None",
        ),
        (
            {"instructions": {**_SCENARIOS[0]["user_scenario"]["instructions"], "known_info": 1}},
            r"instructions\.known_info must be text or null, got 1",
        ),
        ({"persona": ["p"], "instructions": "i"}, r"persona must be text or null"),
        (None, r"expected an object, got NoneType"),
    ],
)
def test_a_scenario_tau2_would_refuse_is_refused_naming_the_task(tmp_path, scenario, said):
    from turnrl.exceptions import InvalidInputError

    bad = {**_SCENARIOS[1], "user_scenario": scenario}
    root = _checkout_with_tasks(tmp_path, [_SCENARIOS[0], bad])
    with pytest.raises(InvalidInputError, match=r"tasks\.json: task 1: user_scenario: " + said):
        envs.load("tau2:airline", root=root, split="test")


def test_the_shared_tasks_render_as_tau2_renders_them():
    """Every shared task's instruction holds all of its scenario's text, each
    line under a tab, below "Instructions:" (tau2's rendering, checked by hand
    above; the shared copy has no guidelines file: turnrl's wording)."""
    from turnrl.envs import users

    for name in ("airline", "retail"):
        raw = {
            str(t["id"]): t["user_scenario"]
            for t in json.loads((TAU2 / "data/tau2/domains" / name / "tasks.json").read_text())
        }
        for task in envs.load(f"tau2:{name}", root=TAU2, split="base").tasks:
            scenario = raw[task.facts["tau2_id"]]
            assert task.instruction.startswith("Instructions:\n\tDomain: ")
            for key, value in scenario["instructions"].items():
                if value is not None and key != "domain":
                    for line in value.splitlines():
                        assert line.strip() == "" or f"\t\t{line}\n" in task.instruction + "\n"
            assert task.user_system_prompt.startswith(
                users.TAU2_USER_GUIDELINES + "\n\n<scenario>\n"
            )


def test_the_cli_s_llm_user_is_shown_the_task_s_tau2_prompt(tmp_path, chat_server, capsys):
    pytest.importorskip("openai")
    from turnrl.cli import main

    root = _checkout_with_tasks(tmp_path / "tau2", _SCENARIOS, "# Planted guidelines\n")
    agent_srv, agent_url = chat_server([], default="Which reservation?")
    user_srv, user_url = chat_server(["Hi, cancel my trip."], default="###STOP###")
    out = tmp_path / "c.jsonl"
    argv = ["rollouts", "collect", "--env", "tau2:airline", "--root", str(root)]
    argv += ["--split", "test", "--tasks", "0", "--samples", "1", "--quiet"]
    argv += ["--agent-model", "p", "--agent-url", agent_url]
    argv += ["--user", "llm", "--user-model", "u", "--user-url", user_url, "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    scenario = _RENDERED["s1"]
    system = f"# Planted guidelines\n\n\n<scenario>\n{scenario}\n</scenario>"
    assert user_srv.requests[0][1]["messages"] == [
        {"role": "system", "content": system},
        {"role": "user", "content": "Hi! How can I help you today?"},
    ]
    assert agent_srv.requests

"""tau-bench domains on the shared data: gold replays, reward, tool texts."""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import random
import re
import warnings
from pathlib import Path

import pytest

from turnrl import envs
from turnrl.envs._calc import calculate
from turnrl.envs._db import canonical, same_state
from turnrl.exceptions import InvalidInputError

SHARED = Path(__file__).parents[1].parent / "shared"
TAU = SHARED / "tau-bench"
needs_tau = pytest.mark.skipif(
    not (TAU / "tau_bench").is_dir(), reason=f"tau-bench data not found at {TAU}"
)

# Gold actions that fail in tau-bench itself (the retail tasks include failed
# look-ups and attempts on purpose); pinned so a change in either side shows.
GOLD_ERRORS = {
    "retail/train": {
        24,
        27,
        81,
        148,
        161,
        214,
        229,
        252,
        253,
        288,
        314,
        349,
        351,
        369,
        376,
        427,
        431,
        441,
        469,
    },
    "retail/dev": set(),
    "retail/test": {2, 3, 4, 12, 13, 21, 35, 36, 37, 38, 39, 46, 47, 54, 55, 64, 67, 68, 106},
    "airline/test": set(),
}
SPLITS = [("taubench:airline", "test"), *[("taubench:retail", s) for s in ("train", "dev", "test")]]


@pytest.fixture(scope="module", params=SPLITS, ids=lambda p: f"{p[0]}-{p[1]}")
def domain(request):
    if not (TAU / "tau_bench").is_dir():
        pytest.skip(f"tau-bench data not found at {TAU}")
    name, split = request.param
    return envs.load(name, root=TAU, split=split)


def _changes_db(domain, task) -> bool:
    return not domain.replay(task)[0].same_as(domain.new_episode(task).store)


def test_gold_actions_replay_and_score_one(domain):
    prefix = domain.tasks[0].id.rsplit("/", 1)[0]
    erroring = set()
    for task in domain.tasks:
        ep = domain.new_episode(task)
        for action in task.actions:
            obs = ep.call(action.name, action.kwargs)
            if obs.startswith("Error"):
                erroring.add(int(task.id.rsplit("/", 1)[1]))
        for out in task.outputs:
            ep.say(f"The answer is {out}.")
        result = ep.reward()
        assert result.reward == 1.0, (task.id, result)
        assert result.db_match is True
        assert result.missing_outputs == []
    assert erroring == GOLD_ERRORS[prefix]


def test_talking_only_scores_zero_when_gold_writes(domain):
    writes = 0
    for task in domain.tasks:
        ep = domain.new_episode(task)
        ep.say("I cannot help with that. " + " ".join(task.outputs))
        result = ep.reward()
        if _changes_db(domain, task):
            writes += 1
            assert result.reward == 0.0, task.id
            assert result.db_match is False
        else:
            assert result.db_match is True
    assert writes > 0


def test_missing_output_scores_zero(domain):
    with_outputs = [t for t in domain.tasks if t.outputs]
    for task in with_outputs[:10]:
        ep = domain.new_episode(task)
        for action in task.actions:
            ep.call(action.name, action.kwargs)
        ep.say("Done.")
        result = ep.reward()
        assert result.reward == 0.0
        assert result.missing_outputs == list(task.outputs)


def test_tools_are_tagged_and_schemas_are_openai_shaped(domain):
    kinds = domain.tool_kinds
    assert set(kinds.values()) == {"read", "write"}
    for tool in domain.tools:
        assert tool["type"] == "function" and tool["kind"] in ("read", "write")
        params = tool["function"]["parameters"]
        assert set(params["required"]) <= set(params["properties"])
    assert all("kind" not in t for t in domain.openai_tools())
    assert (
        "transfer_to_human_agents" in kinds
        and kinds["book_reservation" if "airline" in domain.name else "cancel_pending_order"]
        == "write"
    )


@needs_tau
def test_caller_arguments_are_not_mutated():
    d = envs.load("taubench:airline", root=TAU)
    task = d.tasks[0]  # book_reservation
    ep = d.new_episode(task)
    before = json.dumps([a.as_call() for a in task.actions], sort_keys=True)
    args = task.gold_actions[0]["arguments"]
    snapshot = json.dumps(args, sort_keys=True)
    out = ep.call("book_reservation", args)
    assert not out.startswith("Error"), out
    ep.call("cancel_reservation", {"reservation_id": "HATHAT"})
    assert json.dumps(args, sort_keys=True) == snapshot
    assert json.dumps([a.as_call() for a in task.actions], sort_keys=True) == before


@needs_tau
def test_the_record_of_a_call_is_not_the_database():
    # Tools keep parts of their arguments (a booking's payment list); the
    # episode's record of the call must not change with the database.
    d = envs.load("taubench:airline", root=TAU)
    ep = d.new_episode(0)
    args = d.tasks[0].gold_actions[0]["arguments"]
    assert not ep.call("book_reservation", args).startswith("Error")
    recorded = json.dumps(ep.actions[0].as_call(), sort_keys=True)
    ep.call("cancel_reservation", {"reservation_id": "HATHAT"})
    assert json.dumps(ep.actions[0].as_call(), sort_keys=True) == recorded
    assert ep.actions[0].kwargs == args


@needs_tau
def test_a_tool_call_named_respond_is_an_unknown_tool_not_a_message():
    d = envs.load("taubench:airline", root=TAU)
    ep = d.new_episode(0)
    for arguments in ({}, {"content": 5}, {"content": "hello"}):
        assert ep.call("respond", arguments).startswith("Unknown action")
    assert ep.agent_messages == []
    ep.say("hi")
    assert ep.agent_messages == ["hi"]
    assert ep.reward().reward in (0.0, 1.0)


@needs_tau
def test_all_gold_actions_in_one_message_score_as_the_readme_says():
    """README, Environments: every call run, all 50 airline test tasks score 1;
    the first call only (tau-bench's tool-calling agent), 23 of them score 0."""
    d = envs.load("taubench:airline", root=TAU, split="test")

    def one_message_agent(task):
        def agent(messages, tools):
            if len(messages) == 2 and task.actions:
                return {"content": "", "tool_calls": [a.as_call() for a in task.actions]}
            return {"content": "Done. " + " ".join(task.outputs)}

        return agent

    scores = {
        cap: [
            envs.run_episode(
                one_message_agent(t), d, t, envs.ScriptedUser(), calls_per_message=cap
            )["outcome"]
            for t in d.tasks
        ]
        for cap in (None, 1)
    }
    assert len(d.tasks) == 50 and scores[None] == [1.0] * 50
    assert scores[1].count(0.0) == 23
    assert all(s == 1.0 for t, s in zip(d.tasks, scores[1], strict=True) if len(t.actions) < 2)


@needs_tau
def test_episodes_are_isolated_and_base_untouched():
    d = envs.load("taubench:airline", root=TAU)
    base_user = json.dumps(d.tables["users"]["mia_li_3668"])
    a = d.new_episode(0)
    for action in d.tasks[0].actions:
        a.call(action.name, action.kwargs)
    b = d.new_episode(0)
    assert json.loads(b.call("get_user_details", {"user_id": "mia_li_3668"})) == json.loads(
        base_user
    )
    assert json.dumps(d.tables["users"]["mia_li_3668"]) == base_user
    assert a.reward().reward == 1.0 and b.reward().reward == 0.0


@needs_tau
@pytest.mark.parametrize("name", ["airline", "retail"])
def test_an_argument_named_data_clashes_with_tau_bench_s_own_data_keyword(name):
    # tau-bench calls invoke(data=..., **arguments): Python refuses a second
    # "data" at the call, naming invoke with its module, before any other check.
    d = envs.load(f"taubench:{name}", root=TAU, split="test")
    ep = d.new_episode(0)
    expected = (
        f"Error: tau_bench.envs.{name}.tools.get_user_details.GetUserDetails.invoke() "
        "got multiple values for keyword argument 'data'"
    )
    assert ep.call("get_user_details", {"user_id": "x", "data": {}}) == expected
    assert ep.call("get_user_details", {"zip": 1, "data": None}) == expected
    assert ep.call("calculate", {"data": 1}) == (
        f"Error: tau_bench.envs.{name}.tools.calculate.Calculate.invoke() "
        "got multiple values for keyword argument 'data'"
    )
    assert ep.store.overlay == {}


@needs_tau
def test_airline_error_texts():
    d = envs.load("taubench:airline", root=TAU)
    ep = d.new_episode(0)
    call = ep.call
    assert call("get_user_details", {"user_id": "nobody"}) == "Error: user not found"
    assert call("get_reservation_details", {"reservation_id": "NOPE"}) == "Error: user not found"
    assert call("cancel_reservation", {"reservation_id": "NOPE"}) == "Error: reservation not found"
    assert call("frobnicate", {}) == "Unknown action frobnicate"
    assert call("get_user_details", {}) == (
        "Error: GetUserDetails.invoke() missing 1 required positional argument: 'user_id'"
    )
    assert call("get_user_details", {"user_id": "x", "zip": 1}) == (
        "Error: GetUserDetails.invoke() got an unexpected keyword argument 'zip'"
    )
    assert call("update_reservation_baggages", {"reservation_id": "NOPE"}) == (
        "Error: UpdateReservationBaggages.invoke() missing 3 required positional arguments: "
        "'total_baggages', 'nonfree_baggages', and 'payment_id'"
    )
    book = d.tasks[0].gold_actions[0]["arguments"]
    bad_flight = {**book, "flights": [{"flight_number": "HAT999", "date": "2024-05-20"}]}
    assert call("book_reservation", bad_flight) == "Error: flight HAT999 not found"
    bad_date = {**book, "flights": [{"flight_number": "HAT136", "date": "2030-01-01"}]}
    assert call("book_reservation", bad_date) == "Error: flight HAT136 not found on date 2030-01-01"
    underpaid = {**book, "payment_methods": [{"payment_id": "credit_card_4421486", "amount": 1}]}
    assert call("book_reservation", underpaid) == (
        "Error: payment amount does not add up, total price is 255, but paid 1"
    )
    unknown_pay = {**book, "payment_methods": [{"payment_id": "gift_card_0", "amount": 255}]}
    assert call("book_reservation", unknown_pay) == "Error: payment method gift_card_0 not found"
    assert call(
        "update_reservation_passengers", {"reservation_id": "4WQ150", "passengers": []}
    ) == ("Error: number of passengers does not match")
    assert call("calculate", {"expression": "2 + x"}) == "Error: invalid characters in expression"
    assert call("calculate", {"expression": "1 / 0"}) == "Error: division by zero"
    assert call("calculate", {"expression": "(65 + 83) * 2"}) == "296.0"
    assert call("transfer_to_human_agents", {"summary": "s"}) == "Transfer successful"
    assert ep.done


@needs_tau
def test_retail_error_texts():
    d = envs.load("taubench:retail", root=TAU, split="dev")
    ep = d.new_episode(0)
    call = ep.call
    assert call("get_order_details", {"order_id": "#W0"}) == "Error: order not found"
    assert call("find_user_id_by_email", {"email": "no@x"}) == "Error: user not found"
    assert call("get_product_details", {"product_id": "0"}) == "Error: product not found"
    delivered = next(k for k, o in d.tables["orders"].items() if o["status"] == "delivered")
    pending = next(k for k, o in d.tables["orders"].items() if o["status"] == "pending")
    assert call("cancel_pending_order", {"order_id": delivered, "reason": "no longer needed"}) == (
        "Error: non-pending order cannot be cancelled"
    )
    assert call("cancel_pending_order", {"order_id": pending, "reason": "meh"}) == (
        "Error: invalid reason"
    )
    assert (
        call(
            "return_delivered_order_items",
            {"order_id": pending, "item_ids": [], "payment_method_id": "x"},
        )
        == "Error: non-delivered order cannot be returned"
    )
    assert (
        call(
            "modify_pending_order_items",
            {
                "order_id": pending,
                "item_ids": ["1"],
                "new_item_ids": ["2"],
                "payment_method_id": "x",
            },
        )
        == "Error: 1 not found"
    )
    assert ep.store.overlay == {}  # nothing above wrote


def test_calculate_matches_python_on_safe_inputs():
    for expr, expected in [
        ("2 + 2", "4.0"),
        ("(1.5 + 2.25) * 4 / 3", "5.0"),
        ("-3 - -2", "-1.0"),
        ("2 ** 10", "1024.0"),
        ("7 // 2", "3.0"),
        ("10 / 3", "3.33"),
        ("1.0 / 0", "Error: float division by zero"),
        ("2 +", "Error: invalid syntax (<string>, line 1)"),
        # eval strips leading spaces, and models write them.
        (" 1+1", "2.0"),
        ("   3 * 4 ", "12.0"),
        # Large powers as upstream: float powers compute, integer ones fail
        # in the float conversion.
        ("1.00001 ** 100000", "2.72"),
        ("2.0 ** -20000", "0.0"),
        ("2 ** 20000", "Error: int too large to convert to float"),
        ("10.0 ** 400", "Error: (34, 'Numerical result out of range')"),
    ]:
        assert calculate(expr) == expected, expr
    assert calculate("9 ** 9 ** 9").startswith("Error")
    # Implicit products are calls for eval: the callee and the arguments are
    # evaluated, then calling a number fails; compiling them warns
    # (SyntaxWarning), which must not reach the caller.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert calculate("2(3 + 4)") == "Error: 'int' object is not callable"
        assert calculate("(1 + 0.5)(2)(3)") == "Error: 'float' object is not callable"
        assert calculate("()(1)") == "Error: 'tuple' object is not callable"
        assert calculate("2(1 / 0)") == "Error: division by zero"
        assert calculate("2()") == "Error: 'int' object is not callable"
    assert calculate("__import__('os')") == "Error: invalid characters in expression"


def test_calculate_takes_long_sums_as_upstreams_eval_does():
    """A sum of 1,000 terms nests 1,000 deep: a recursive walk hit Python's
    recursion limit where upstream's eval answers."""
    rng = random.Random(7)
    terms = [rng.randint(0, 99) for _ in range(1500)]
    signs = [rng.choice((1, -1)) for _ in terms]
    signs[0] = 1
    expression = " ".join(
        f"{'+' if sign > 0 else '-'} {t}" for sign, t in zip(signs, terms, strict=True)
    )
    want = sum(sign * t for sign, t in zip(signs, terms, strict=True))
    assert calculate(expression.removeprefix("+ ")) == str(round(float(want), 2))
    assert calculate("-" * 2000 + "5") == "5.0"
    # Past what eval's compilation takes (about 3,000 terms; 10,000 from
    # Python 3.13), upstream answers with the compiler's text.
    assert calculate("+".join(["1"] * 20_000)) == (
        "Error: maximum recursion depth exceeded during compilation"
    )


EVAL_NEEDS_A_STRING = "Error: eval() arg 1 must be a string, bytes or code object"


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ([], EVAL_NEEDS_A_STRING),
        (["1", "+", "2"], EVAL_NEEDS_A_STRING),
        # Upstream's test is `item in "0123456789+-*/(). "`: a substring test.
        (["12"], EVAL_NEEDS_A_STRING),
        ([""], EVAL_NEEDS_A_STRING),
        ({"1": 2}, EVAL_NEEDS_A_STRING),
        (["1+2"], "Error: invalid characters in expression"),
        (["x"], "Error: invalid characters in expression"),
    ],
)
def test_calculate_on_json_that_is_not_a_string_answers_as_upstream(expression, expected):
    """tau-bench v1 hands a list or object to its character test and then to
    eval; the texts follow from that (checked against upstream's tool)."""
    assert calculate(expression) == expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ([1, 2], "'in <string>' requires string as left operand, not int"),
        ([["1"]], "'in <string>' requires string as left operand, not list"),
        (5, "'int' object is not iterable"),
        (None, "'NoneType' object is not iterable"),
    ],
)
def test_calculate_raises_where_upstream_raises(expression, message):
    """Upstream's character test raises outside its try; the episode turns the
    exception into an ``Error: ...`` observation, as tau-bench's step does."""
    with pytest.raises(TypeError) as raised:
        calculate(expression)
    assert str(raised.value) == message


def test_state_equality_follows_the_hash():
    assert same_state({"a": 1, "b": [1, 2]}, {"b": [1, 2], "a": 1})
    assert not same_state({"a": 1}, {"a": 1.0})
    assert not same_state({"a": 1}, {"a": True})
    assert not same_state({"a": [1, 2]}, {"a": [2, 1]})
    assert same_state({"a": {"x": 1}}, {"a": [["x", 1]]}) == (
        str(canonical({"a": {"x": 1}})) == str(canonical({"a": [["x", 1]]}))
    )


def test_pass_hat_k_matches_the_definition():
    results = [
        {"task_id": 0, "reward": 1.0, "trial": 0},
        {"task_id": 0, "reward": 1.0, "trial": 1},
        {"task_id": 0, "reward": 0.0, "trial": 2},
        {"task_id": 1, "reward": 0.0, "trial": 0},
        {"task_id": 1, "reward": 1.0, "trial": 1},
        {"task_id": 1, "reward": 0.0, "trial": 2},
    ]
    # task 0: c=2, task 1: c=1, n=3
    assert envs.pass_hat_k(results, 1) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert envs.pass_hat_k(results, 2) == pytest.approx((1 / 3 + 0) / 2)
    assert envs.pass_hat_k(results, 3) == 0.0
    assert envs.pass_hat_k([("a", 1.0), ("a", 1.0)], 2) == 1.0
    with pytest.raises(ValueError, match="k=4"):
        envs.pass_hat_k(results, 4)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown environment"):
        envs.load("taubench:bank", root=tmp_path)
    with pytest.raises(ValueError, match=r"root .*a tau-bench checkout; --root of the turnrl"):
        envs.load("taubench:airline")
    with pytest.raises(ValueError, match="a tau2-bench checkout"):
        envs.load("tau2:retail")
    with pytest.raises(OSError, match=r"flights\.json"):
        envs.load("taubench:airline", root=tmp_path)


def test_task_file_is_parsed_not_executed(tmp_path):
    base = tmp_path / "tau_bench" / "envs" / "airline"
    (base / "data").mkdir(parents=True)
    for n in ("flights", "reservations", "users"):
        (base / "data" / f"{n}.json").write_text("{}")
    (base / "wiki.md").write_text("policy")
    (base / "tasks_test.py").write_text(
        "import os\nos.system('touch PWNED')\n"
        "TASKS = [Task(user_id='u', instruction='i', actions=[Action(name='think', "
        "kwargs={'thought': 'x'})], outputs=['o'])]\n"
    )
    d = envs.load("taubench:airline", root=tmp_path)
    assert d.policy == "policy" and d.tasks[0].outputs == ("o",)
    assert not (Path.cwd() / "PWNED").exists()
    (base / "tasks_test.py").write_text("TASKS = [Task(user_id=f(), instruction='i')]\n")
    with pytest.raises(ValueError, match=r"tasks_test.py:1: Task user_id is not a literal"):
        envs.load("taubench:airline", root=tmp_path)


class _InPlaceStore(envs._db.Store):
    """Reference: tau-bench's way, every write in place on a full private copy."""

    def __init__(self, base_json):
        super().__init__(json.loads(base_json))

    def mut(self, table, key):
        return self.base[table][key]

    def put(self, table, key, record):
        self.base[table][key] = record


def _reference_hash(tables) -> str:
    def hashable(x):
        if isinstance(x, dict):
            return tuple((k, hashable(v)) for k, v in sorted(x.items()))
        if isinstance(x, list):
            return tuple(hashable(v) for v in x)
        return x

    return hashlib.sha256(str(hashable(tables)).encode()).hexdigest()


def _perturbed_calls(rng, task, pool):
    calls = []
    for a in [*task.actions, rng.choice(task.actions)] if task.actions else []:
        args = copy.deepcopy(dict(a.kwargs))
        if args and rng.random() < 0.5:
            key = rng.choice(sorted(args))
            args[key] = rng.choice(pool.get(key, [None]))
        calls.append((a.name, args))
    return calls


@needs_tau
@pytest.mark.parametrize("name,split", [("taubench:airline", "test"), ("taubench:retail", "dev")])
def test_copy_on_write_matches_in_place_reference(name, split):
    d = envs.load(name, root=TAU, split=split)
    pool: dict = {}
    for t in d.tasks:
        for a in t.actions:
            for k, v in a.kwargs.items():
                pool.setdefault(k, []).append(v)
    rng = random.Random(7)
    gold_hash = {}
    base_json = json.dumps(d.tables)
    for task in d.tasks[::3]:
        ref_gold = _InPlaceStore(base_json)
        for a in task.actions:
            if a.name not in d.terminate_tools:
                d._invoke(ref_gold, a.name, copy.deepcopy(dict(a.kwargs)))
        gold_hash[task.id] = _reference_hash(ref_gold.base)
        for _ in range(2):
            calls = _perturbed_calls(rng, task, pool)
            ep = d.new_episode(task)
            ref = _InPlaceStore(base_json)
            for n, args in calls:
                assert ep.call(n, args) == d._invoke(ref, n, copy.deepcopy(args))[0]
            assert json.dumps(ep.store.materialize()) == json.dumps(ref.base)
            expected = _reference_hash(ref.base) == gold_hash[task.id]
            assert ep.reward().db_match is expected, task.id


def test_checkout_tool_schemas_are_read_not_executed(tmp_path):
    base = tmp_path / "tau_bench" / "envs" / "airline"
    (base / "data").mkdir(parents=True)
    (base / "tools").mkdir()
    for n in ("flights", "reservations", "users"):
        (base / "data" / f"{n}.json").write_text("{}")
    (base / "wiki.md").write_text("policy")
    (base / "tasks_test.py").write_text("TASKS = [Task(user_id='u', instruction='i')]\n")
    (base / "tools" / "get_user_details.py").write_text(
        "import os\nos.system('touch PWNED')\n"
        "class GetUserDetails:\n"
        "    @staticmethod\n"
        "    def get_info():\n"
        "        return {'type': 'function', 'function': {'name': 'get_user_details',\n"
        "                'description': 'EXACT UPSTREAM TEXT', 'parameters': {'type': 'object',\n"
        "            'properties': {'user_id': {'type': 'string'}}, 'required': ['user_id']}}}\n"
    )
    d = envs.load("taubench:airline", root=tmp_path)
    by_name = {t["function"]["name"]: t for t in d.tools}
    assert by_name["get_user_details"]["function"]["description"] == "EXACT UPSTREAM TEXT"
    assert by_name["get_user_details"]["kind"] == "read"
    assert by_name["cancel_reservation"]["function"]["description"] != "EXACT UPSTREAM TEXT"
    builtin = envs.load("taubench:airline", root=tmp_path, schemas="builtin")
    assert {t["function"]["description"] for t in builtin.tools} != {"EXACT UPSTREAM TEXT"}
    assert "EXACT UPSTREAM TEXT" not in json.dumps(builtin.tools)
    assert not (Path.cwd() / "PWNED").exists() and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name", ["tau2:airline", "tau2:retail"])
@pytest.mark.parametrize("schemas", ["auto", "builtin", "checkout"])
def test_tau2_domains_refuse_schemas_instead_of_ignoring_it(tmp_path, name, schemas):
    # tau2-bench has no schema text to read (its code builds them), so no
    # value of schemas= could be honoured: it is refused, naming both.
    with pytest.raises(InvalidInputError, match=rf"{name}: schemas={schemas!r} is for taubench"):
        envs.load(name, root=tmp_path, schemas=schemas)


@pytest.mark.parametrize("options", [{"schemas": "builtin"}, {"n_user": 3, "seed": 1}])
def test_synthetic_domains_refuse_options_they_do_not_take(options):
    # As the other families refuse theirs: a TypeError from the generator,
    # naming neither the domain nor the options it takes, used to come out.
    unknown = sorted(set(options) - {"seed"})
    with pytest.raises(
        InvalidInputError,
        match=rf"synthetic:airline: unexpected options {re.escape(str(unknown))}; it takes "
        "seed, n_users, n_routes and n_tasks",
    ):
        envs.load("synthetic:airline", **options)
    assert len(envs.load("synthetic:airline", seed=1, n_users=2, n_tasks=3).tasks) == 3
    # The options load lets through are the generator's own.
    taken = list(inspect.signature(envs.synthetic.generate).parameters)
    assert taken == ["seed", "n_users", "n_routes", "n_tasks"]

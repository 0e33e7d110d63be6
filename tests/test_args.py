"""turnrl.compare_args / normalize_args / label_tiers against the plain Python
reference in tests/args_reference.py, plus explicit cases on tau-bench's
airline gold actions."""

from __future__ import annotations

import ast
import json
import math
import struct
from decimal import Decimal
from pathlib import Path
from typing import Any

import args_reference as ref
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strict import strict_equal

import turnrl
from turnrl.exceptions import InvalidInputError

TASKS_FILE = Path(__file__).resolve().parents[1] / ".." / "shared" / "tau-bench"
TASKS_FILE = TASKS_FILE / "tau_bench" / "envs" / "airline" / "tasks_test.py"

AIRLINE_TOOLS = {
    "get_user_details": "read",
    "get_reservation_details": "read",
    "search_direct_flight": "read",
    "search_onestop_flight": "read",
    "list_all_airports": "read",
    "calculate": "read",
    "think": "read",
    "book_reservation": "write",
    "cancel_reservation": "write",
    "update_reservation_baggages": "write",
    "update_reservation_flights": "write",
    "update_reservation_passengers": "write",
    "send_certificate": "write",
    "transfer_to_human_agents": "write",
}

# ---------------------------------------------------------------------------
# Strategies

TEXT = st.text(alphabet="abcXYZ 09.-_\u00e9\t\u03a3\u03c3\u0130\u00df\u00a0\u2003", max_size=6)
NUMERIC_TEXT = st.sampled_from(
    ["5", " 5 ", "05", "1e3", "5.", ".5", "+5", "-0", "0.50", "-1.000", "", "  ",
     "12345678901234567890123", "0.1", "1.00000000000000000001", "007", "18446744073709551616"]
)  # fmt: skip
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-10, 10),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.1, 5.0, -0.0, 1e16, 1e20, 2.5]),
    TEXT,
    NUMERIC_TEXT,
    st.from_regex(r"-?(0|[1-9][0-9]{0,22})(\.[0-9]{1,22})?", fullmatch=True),
)
KEYS = st.sampled_from(["a", "b", "c", "tags", "A", "x y", "dob", "_k1", ""])


def json_values(max_leaves: int = 30) -> st.SearchStrategy[Any]:
    return st.recursive(
        LEAVES,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(KEYS, inner, max_size=4),
        ),
        max_leaves=max_leaves,
    )


POLICIES = st.fixed_dictionaries(
    {
        "case_fold": st.booleans(),
        "unordered_keys": st.sampled_from(
            [(), ("tags",), ("tags", "a"), ("a[*]", "$"), ("b.tags", "c")]
        ),
        "soft_max_fraction": st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
    }
)


@st.composite
def perturbed(draw: st.DrawFn, value: Any, rate: float = 0.15) -> Any:
    """A variant of `value`: same meaning mostly (key order, numeric strings,
    padding, case, empties, reordered lists), sometimes a changed leaf."""
    roll = draw(st.floats(0, 1))
    if isinstance(value, dict):
        keys = draw(st.permutations(list(value)))
        out = {k: draw(perturbed(value[k], rate)) for k in keys}
        if draw(st.booleans()):
            out[draw(KEYS)] = draw(st.sampled_from([None, "", [], {}, " "]))
        return out
    if isinstance(value, list):
        items = [draw(perturbed(x, rate)) for x in value]
        if roll < 0.3:
            items = list(draw(st.permutations(items)))
        return items
    if roll < rate:
        return draw(LEAVES)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return draw(st.sampled_from([value, str(value), f" {value} ", float(value)]))
    if isinstance(value, str):
        return draw(st.sampled_from([value, value.upper(), f" {value}\n", value.lower()]))
    return value


def as_dict(c: turnrl.ArgComparison) -> dict[str, Any]:
    return {
        "kind": c.kind,
        "diffs": c.diffs,
        "differing_leaves": c.differing_leaves,
        "gold_leaves": c.gold_leaves,
        "structural": c.structural,
    }


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------
# Against the reference


@FAST
@given(value=json_values(), policy=POLICIES)
def test_normalize_matches_reference(value: Any, policy: dict[str, Any]) -> None:
    del policy["soft_max_fraction"]
    got = turnrl.normalize_args(value, **policy)
    want = ref.normalize(value, policy["case_fold"], policy["unordered_keys"])
    assert strict_equal(got, want), (got, want)
    # Idempotent, and the normal form compares exact with the original.
    assert strict_equal(turnrl.normalize_args(got, **policy), got)
    assert turnrl.compare_args(value, got, **policy).kind == "exact"


@FAST
@given(data=st.data(), gold=json_values(), policy=POLICIES)
def test_compare_matches_reference_on_perturbations(
    data: st.DataObject, gold: Any, policy: dict[str, Any]
) -> None:
    pred = data.draw(perturbed(gold))
    got = as_dict(turnrl.compare_args(pred, gold, **policy))
    want = ref.compare(
        pred, gold, policy["case_fold"], policy["unordered_keys"], policy["soft_max_fraction"]
    )
    assert got == want


@FAST
@given(pred=json_values(12), gold=json_values(12), policy=POLICIES)
def test_compare_matches_reference_on_unrelated_values(
    pred: Any, gold: Any, policy: dict[str, Any]
) -> None:
    got = as_dict(turnrl.compare_args(pred, gold, **policy))
    want = ref.compare(
        pred, gold, policy["case_fold"], policy["unordered_keys"], policy["soft_max_fraction"]
    )
    assert got == want
    back = turnrl.compare_args(gold, pred, **policy)
    # What is symmetric: exactness, structure and the count of differing leaves
    # (not the soft verdict, whose threshold counts the gold leaves).
    assert (back.kind == "exact") == (got["kind"] == "exact")
    assert back.structural == got["structural"]
    assert back.differing_leaves == got["differing_leaves"]
    assert len(back.diffs) == len(got["diffs"])


@FAST
@given(value=json_values(), policy=POLICIES)
def test_self_comparison_is_exact(value: Any, policy: dict[str, Any]) -> None:
    c = turnrl.compare_args(value, value, **policy)
    assert c.kind == "exact" and c.diffs == []


@FAST
@given(data=st.data(), policy=POLICIES)
def test_batch_equals_single_calls(data: st.DataObject, policy: dict[str, Any]) -> None:
    golds = data.draw(st.lists(json_values(10), max_size=6))
    pairs = [(data.draw(perturbed(g)), g) for g in golds]
    batch = turnrl.compare_args_batch(pairs, **policy)
    assert [as_dict(c) for c in batch] == [
        as_dict(turnrl.compare_args(p, g, **policy)) for p, g in pairs
    ]


def test_batch_spans_several_chunks() -> None:
    gold = {"a": [1, 2, {"b": "x"}], "c": "5"}
    pairs = [({"a": [1, 2, {"b": "x"}], "c": i % 7}, gold) for i in range(2000)]
    kinds = [c.kind for c in turnrl.compare_args_batch(pairs)]
    assert kinds == ["exact" if i % 7 == 5 else "soft" for i in range(2000)]


# ---------------------------------------------------------------------------
# Explicit rules


@pytest.mark.parametrize(
    ("pred", "gold", "kind"),
    [
        ({"n": "5"}, {"n": 5}, "exact"),
        ({"n": 5.0}, {"n": "5"}, "exact"),
        ({"n": " 5 "}, {"n": 5}, "exact"),
        ({"n": "-0"}, {"n": 0.0}, "exact"),
        ({"n": "0.50"}, {"n": 0.5}, "exact"),
        ({"n": "05"}, {"n": 5}, "mismatch"),
        ({"n": "1e3"}, {"n": 1000}, "mismatch"),
        ({"n": 1e3}, {"n": 1000}, "exact"),
        ({"n": "5."}, {"n": 5}, "mismatch"),
        ({"n": True}, {"n": 1}, "mismatch"),
        ({"n": "true"}, {"n": True}, "mismatch"),
        ({"n": 10**30}, {"n": "1" + "0" * 30}, "exact"),
        ({"n": 10**30 + 1}, {"n": 10**30}, "mismatch"),
        ({"n": 2**64}, {"n": str(2**64)}, "exact"),
        ({"n": 0.1}, {"n": "0.1"}, "exact"),
        ({"n": 0.1 + 0.2}, {"n": 0.3}, "mismatch"),
        ({"a": 1, "b": None}, {"a": 1}, "exact"),
        ({"a": 1, "b": ""}, {"a": 1, "c": []}, "exact"),
        ({"a": 1, "b": {"c": {}}}, {"a": 1}, "exact"),
        ({"a": 1, "b": "  "}, {"a": 1}, "exact"),
        ({"s": " JFK "}, {"s": "JFK"}, "exact"),
        ({"s": "jfk"}, {"s": "JFK"}, "mismatch"),
        ({"l": [1, 2]}, {"l": [2, 1]}, "mismatch"),
        ({"l": [None]}, {"l": []}, "mismatch"),
        ({}, {}, "exact"),
    ],
)
def test_rules(pred: dict, gold: dict, kind: str) -> None:
    assert turnrl.compare_args(pred, gold).kind == kind
    assert ref.compare(pred, gold)["kind"] == kind


def test_case_fold_and_unordered_keys() -> None:
    assert turnrl.compare_args({"s": "jfk"}, {"s": "JFK"}, case_fold=True).kind == "exact"
    # Keys are never folded.
    assert turnrl.compare_args({"S": "x"}, {"s": "x"}, case_fold=True).kind == "mismatch"
    pred = {"payment_methods": [{"id": "b"}, {"id": "a"}], "x": {"tags": [2, 1]}}
    gold = {"payment_methods": [{"id": "a"}, {"id": "b"}], "x": {"tags": [1, 2]}}
    assert turnrl.compare_args(pred, gold).diffs == [
        "payment_methods[0].id",
        "payment_methods[1].id",
        "x.tags[0]",
        "x.tags[1]",
    ]
    assert turnrl.compare_args(pred, gold, unordered_keys=["payment_methods", "tags"]).kind == (
        "exact"
    )
    # A path entry matches only that place.
    c = turnrl.compare_args(pred, gold, unordered_keys=["x.tags"])
    assert c.diffs == ["payment_methods[0].id", "payment_methods[1].id"]
    assert turnrl.compare_args([2, 1], [1, 2], unordered_keys={"$"}).kind == "exact"


def test_diff_paths() -> None:
    gold = {
        "user_id": "mia_li_3668",
        "passengers": [{"first_name": "Mia", "dob": "1990-04-05"}],
        "payment_methods": [{"payment_id": "a", "amount": 1}] * 3,
        "odd key": {"k.1": 1},
    }
    pred = {
        "user_id": "mia_li_3669",
        "passengers": [{"first_name": "Mia", "dob": "1990-04-06"}],
        "payment_methods": [{"payment_id": "a", "amount": 1}] * 2,
        "odd key": {"k.1": 2},
    }
    c = turnrl.compare_args(pred, gold)
    assert c.diffs == [
        '["odd key"]["k.1"]',
        "passengers[0].dob",
        "payment_methods[2]",
        "user_id",
    ]
    assert c.kind == "mismatch" and c.structural
    c = turnrl.compare_args({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"d": 2}})
    assert c.diffs == ["b.c", "b.d"]
    c = turnrl.compare_args({"a": [1, [2, 3]]}, {"a": [1, [2, 4]]})
    assert c.diffs == ["a[1][1]"]
    assert repr(c) == "ArgComparison(kind='soft', diffs=['a[1][1]'])"


def test_soft_threshold() -> None:
    gold = {"a": 1, "b": 2, "c": 3, "d": 4}
    one_off = {**gold, "d": 5}
    two_off = {**gold, "c": 0, "d": 5}
    assert turnrl.compare_args(one_off, gold).kind == "soft"
    # Two of four is not "fewer than half".
    assert turnrl.compare_args(two_off, gold).kind == "mismatch"
    assert turnrl.compare_args(two_off, gold, soft_max_fraction=0.75).kind == "soft"
    assert turnrl.compare_args(one_off, gold, soft_max_fraction=0.0).kind == "mismatch"
    # A missing key is structural: never soft.
    assert turnrl.compare_args({"a": 1, "b": 2, "c": 3}, gold).kind == "mismatch"
    with pytest.raises(InvalidInputError, match="soft_max_fraction"):
        turnrl.compare_args(gold, gold, soft_max_fraction=1.5)
    with pytest.raises(InvalidInputError, match="soft_max_fraction"):
        turnrl.compare_args(gold, gold, soft_max_fraction=math.nan)


def test_normalize_examples() -> None:
    out = turnrl.normalize_args(
        {"b": " X ", "a": "5", "e": "", "f": 10**30, "g": "0.12345678901234567890", "h": [3.0]},
        case_fold=True,
    )
    assert strict_equal(
        out,
        {"a": 5, "b": "x", "f": "1" + "0" * 30, "g": "0.1234567890123456789", "h": [3]},
    )
    assert turnrl.normalize_args({"x": [None, {}]}) == {"x": [None, None]}
    assert turnrl.normalize_args({"x": {"y": None}}) is None
    assert turnrl.normalize_args({"t": ["b", "a"]}, unordered_keys=["t"]) == {"t": ["a", "b"]}


def test_bad_input_names_the_path() -> None:
    with pytest.raises(InvalidInputError, match=r"pred\.a\[1\]\.b: NaN is not a finite number"):
        turnrl.compare_args({"a": [0, {"b": math.nan}]}, {})
    with pytest.raises(InvalidInputError, match=r"gold\.x: inf is not a finite number"):
        turnrl.compare_args({}, {"x": math.inf})
    with pytest.raises(InvalidInputError, match=r"gold\.x: key 3 of type int is not a string"):
        turnrl.compare_args({}, {"x": {3: 1}})
    with pytest.raises(InvalidInputError, match=r"obj\.s: a set is not JSON"):
        turnrl.normalize_args({"s": {1, 2}})
    with pytest.raises(InvalidInputError, match="unordered_keys must be an iterable"):
        turnrl.compare_args({}, {}, unordered_keys="tags")
    assert isinstance(InvalidInputError("x"), ValueError)


def test_deep_nesting_is_a_clear_error() -> None:
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InvalidInputError, match=r"pred\.a(\[0\])+: nested deeper than 256"):
        turnrl.compare_args({"a": deep}, {})
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(InvalidInputError, match="nested deeper"):
        turnrl.normalize_args(cyclic)
    ok: Any = "x"
    for _ in range(200):
        ok = {"k": ok}
    assert turnrl.compare_args(ok, ok).kind == "exact"


def test_numpy_scalars_are_numbers() -> None:
    np = pytest.importorskip("numpy")
    assert turnrl.compare_args({"n": np.int64(5)}, {"n": "5"}).kind == "exact"
    assert turnrl.compare_args({"n": np.float64(2.5)}, {"n": "2.5"}).kind == "exact"


# ---------------------------------------------------------------------------
# Tiers on tau-bench airline gold actions


def airline_tasks() -> list[list[dict[str, Any]]]:
    """Gold actions of tau-bench's airline test tasks, read with ast (never executed)."""
    if not TASKS_FILE.exists():
        pytest.skip(f"{TASKS_FILE} not available")
    tree = ast.parse(TASKS_FILE.read_text())
    tasks = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Task":
            actions_node = next(k.value for k in node.keywords if k.arg == "actions")
            actions = []
            for call in actions_node.elts:
                kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
                actions.append({"name": kw["name"], "arguments": kw["kwargs"]})
            tasks.append(actions)
    assert len(tasks) == 50
    return tasks


def trajectory(calls: list[dict[str, Any]], results: list[str] | None = None) -> list[dict]:
    """A rollout's turns: user, then one assistant turn per call with its result."""
    turns: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]
    for i, call in enumerate(calls):
        turns.append({"role": "assistant", "content": "", "tool_calls": [call]})
        content = results[i] if results else "{}"
        turns.append({"role": "tool", "name": call["name"], "content": content})
    turns.append({"role": "assistant", "content": "Done."})
    return turns


def test_every_gold_action_called_is_gold() -> None:
    for gold in airline_tasks():
        labels = turnrl.label_tiers(trajectory(gold), gold, AIRLINE_TOOLS)
        assistant = [t for t in labels.tiers if t is not None]
        assert assistant == ["gold"] * len(gold) + ["respond"]
        assert labels.matched_gold == list(range(len(gold)))
        assert labels.gold_turn == [1 + 2 * i for i in range(len(gold))]


def _booking_task() -> list[dict[str, Any]]:
    return next(
        g for g in airline_tasks() if g and g[0]["name"] == "book_reservation" and len(g) == 1
    )


def test_reordered_keys_and_numeric_strings_still_gold() -> None:
    gold = _booking_task()
    args = gold[0]["arguments"]
    reordered = dict(reversed(list(args.items())))
    reordered["total_baggages"] = str(args["total_baggages"])
    reordered["payment_methods"] = [
        {"amount": f" {p['amount']} ", "payment_id": p["payment_id"]}
        for p in args["payment_methods"]
    ]
    call = {"name": "book_reservation", "arguments": reordered}
    labels = turnrl.label_tiers(trajectory([call]), gold, AIRLINE_TOOLS)
    assert labels.tiers[1] == "gold"
    # Also as a JSON string, as OpenAI-style messages carry it.
    call = {"name": "book_reservation", "arguments": json.dumps(reordered)}
    assert turnrl.label_tiers(trajectory([call]), gold, AIRLINE_TOOLS).tiers[1] == "gold"


def test_changed_dob_is_soft_or_mismatch_by_policy() -> None:
    gold = _booking_task()
    args = gold[0]["arguments"]
    changed = {**args, "passengers": [{**args["passengers"][0], "dob": "1990-04-06"}]}
    c = turnrl.compare_args(changed, args)
    assert c.diffs == ["passengers[0].dob"]
    assert c.kind == "soft"
    call = {"name": "book_reservation", "arguments": changed}
    labels = turnrl.label_tiers(trajectory([call]), gold, AIRLINE_TOOLS)
    assert labels.tiers[1] == "soft"
    assert labels.soft_gold == [0] and labels.matched_gold == []
    strict = turnrl.label_tiers(trajectory([call]), gold, AIRLINE_TOOLS, soft_max_fraction=0.0)
    assert strict.tiers[1] == "write"
    # A soft match does not consume the gold action: the corrected call is gold.
    labels = turnrl.label_tiers(trajectory([call, gold[0]]), gold, AIRLINE_TOOLS)
    assert [t for t in labels.tiers if t] == ["soft", "gold", "respond"]


def test_errors_unknown_tools_and_repeats() -> None:
    gold = [{"name": "cancel_reservation", "arguments": {"reservation_id": "Z7GOZK"}}]
    calls = [
        {"name": "get_user_details", "arguments": {"user_id": "olivia_gonzalez_2305"}},
        {"name": "cancel_flight", "arguments": {"reservation_id": "Z7GOZK"}},
        {"name": "cancel_reservation", "arguments": {"reservation_id": "Z7GOZK"}},
        {"name": "cancel_reservation", "arguments": {"reservation_id": "Z7GOZK"}},
        {"name": "cancel_reservation", "arguments": {"reservation_id": "XXXXXX"}},
        {"name": "get_reservation_details", "arguments": {"reservation_id": "NOPE"}},
    ]
    results = [
        "{}",
        "Unknown action cancel_flight",
        "{}",
        "{}",
        "{}",
        "Error: reservation not found",
    ]
    labels = turnrl.label_tiers(trajectory(calls, results), gold, AIRLINE_TOOLS)
    assert [t for t in labels.tiers if t] == [
        "read", "error", "gold", "write", "write", "error", "respond"
    ]  # fmt: skip
    assert labels.matched_gold == [0] and labels.gold_turn == [5]
    # A gold call whose tool failed matches nothing.
    failed = trajectory(calls[2:3], ["Error: reservation not found"])
    labels = turnrl.label_tiers(failed, gold, AIRLINE_TOOLS)
    assert labels.tiers[1] == "error" and labels.matched_gold == []


def test_precedence_within_one_turn() -> None:
    gold = [
        {"name": "cancel_reservation", "arguments": {"reservation_id": "Z7GOZK"}},
        {"name": "send_certificate", "arguments": {"user_id": "u", "amount": 50, "x": 1}},
    ]
    read = {"name": "get_user_details", "arguments": {"user_id": "u"}}
    write = {"name": "update_reservation_baggages", "arguments": {"reservation_id": "A"}}
    exact = gold[0]
    soft = {"name": "send_certificate", "arguments": {"user_id": "u", "amount": 50, "x": 2}}
    unknown = {"name": "nope", "arguments": {}}

    def tier(calls: list[dict], errors: list[str] | None = None) -> str | None:
        turn: dict[str, Any] = {"role": "assistant", "content": "", "tool_calls": calls}
        if errors:
            turn["errors"] = errors
        turns = [turn] + [{"role": "tool", "content": "ok"} for _ in calls]
        return turnrl.label_tiers(turns, gold, AIRLINE_TOOLS).tiers[0]

    assert tier([read, write]) == "write"
    assert tier([write, soft, read]) == "soft"
    assert tier([soft, exact, write]) == "gold"
    assert tier([exact, unknown]) == "error"
    assert tier([exact], errors=["unterminated <tool_call> at byte 120"]) == "error"
    assert tier([], errors=["bad json at byte 0"]) == "error"
    assert tier([]) == "respond"
    assert tier([read]) == "read"


def test_label_tiers_bad_input() -> None:
    with pytest.raises(InvalidInputError, match=r"tool_kinds\[\"x\"\] must be"):
        turnrl.label_tiers([], [], {"x": "delete"})
    with pytest.raises(InvalidInputError, match=r"turns\[0\]\.role must be a string"):
        turnrl.label_tiers([{"content": "x"}], [], {})
    with pytest.raises(InvalidInputError, match=r"turns\[1\] must be a dict"):
        turnrl.label_tiers([{"role": "user"}, "oops"], [], {})
    with pytest.raises(InvalidInputError, match=r"gold_actions\[0\]\.name"):
        turnrl.label_tiers([], [{"arguments": {}}], {})


def test_unreadable_calls_are_error_calls_and_the_rest_is_labelled() -> None:
    # One call the labelling cannot read makes that call `error`, never the
    # whole trajectory an exception (a tau-bench import holds thousands).
    deep: dict = {}
    for _ in range(300):
        deep = {"x": deep}
    gold = [{"name": "get", "arguments": {"id": "a"}}]
    good = {"name": "get", "arguments": {"id": "a"}}
    for bad in (
        {"arguments": {}},
        {"name": None, "arguments": {}},
        {"name": "get", "arguments": {"n": float("nan")}},
        {"name": "get", "arguments": {"n": float("inf")}},
        {"name": "get", "arguments": {1: "a"}},
        {"name": "get", "arguments": deep},
        {"name": "get", "arguments": '{"n": NaN}'},
        {"name": "get", "arguments": "not json"},
        {"name": "get", "arguments": object()},
        "get",
    ):
        turns = [{"role": "assistant", "tool_calls": [bad, good]}]
        labels = turnrl.label_tiers(turns, gold, {"get": "read"})
        assert labels.call_tiers == [["error", "gold"]], bad
        assert labels.tiers == ["error"] and labels.matched_gold == [0], bad


def test_json_string_arguments_keep_big_integers_exact() -> None:
    big = 12345678901234567890123
    gold = [{"name": "book", "arguments": {"a": big}}]
    for arguments in (json.dumps({"a": big}), {"a": big}):
        turns = [{"role": "assistant", "tool_calls": [{"name": "book", "arguments": arguments}]}]
        assert turnrl.label_tiers(turns, gold, {"book": "write"}).tiers == ["gold"]
    off_by_one = json.dumps({"a": big + 1})
    turns = [{"role": "assistant", "tool_calls": [{"name": "book", "arguments": off_by_one}]}]
    assert turnrl.label_tiers(turns, gold, {"book": "write"}).tiers == ["write"]


@pytest.mark.parametrize(
    ("differing", "leaves", "fraction", "kind"),
    [
        (7, 25, 0.28, "mismatch"),
        (6, 25, 0.28, "soft"),
        (7, 100, 0.07, "mismatch"),
        (6, 100, 0.07, "soft"),
        (7, 50, 0.14, "mismatch"),
        (14, 25, 0.56, "mismatch"),
    ],
)
def test_the_soft_limit_is_the_decimal_fraction(
    differing: int, leaves: int, fraction: float, kind: str
) -> None:
    # In floats 0.28 * 25 is 7.000000000000001; the rule is "fewer than".
    gold = {f"k{i}": i for i in range(leaves)}
    pred = {k: (v + 1000 if i < differing else v) for i, (k, v) in enumerate(gold.items())}
    got = turnrl.compare_args(pred, gold, soft_max_fraction=fraction)
    assert (got.kind, got.differing_leaves, got.gold_leaves) == (kind, differing, leaves)
    assert ref.compare(pred, gold, soft_max_fraction=fraction)["kind"] == kind


def test_floats_compare_by_their_python_repr() -> None:
    # 1000000000000000.25 lies halfway between two 17-digit decimals that
    # both read back as it; Python prints the even one, and so a model that
    # copies Python's output must match.
    for x in (1e15 + 0.25, -(1e15 + 0.25), 1801514316094494.25, 1e15 + 0.75):
        assert turnrl.compare_args(repr(x), x).kind == "exact", x
        assert turnrl.compare_args({"p": repr(x)}, {"p": x}).kind == "exact", x
        assert turnrl.normalize_args([repr(x)]) == [x] == ref.normalize([repr(x)])


@settings(max_examples=300, deadline=None)
@given(st.integers(10**15, 2**50 - 1), st.sampled_from([0.25, 0.75]), st.booleans())
def test_halfway_floats_match_the_reference(whole: int, frac: float, negative: bool) -> None:
    x = (whole + frac) * (-1 if negative else 1)
    assert turnrl.normalize_args({"x": x}) == ref.normalize({"x": x})
    assert turnrl.compare_args(repr(x), x).kind == "exact"


def test_floats_halfway_between_two_shorter_forms_take_the_even_one() -> None:
    # 8 + 2**-16 is 8.0000152587890625: 8.000015258789062 and ...063 both
    # read back as it, and Python prints the even one (ties happen at every
    # length, not only with 17 digits).
    x = 8 + 1 / 65536
    assert repr(x) == "8.000015258789062"
    for value in (x, -x, -607150627375807.2):
        assert turnrl.compare_args({"a": value}, {"a": repr(value)}).kind == "exact"
        assert turnrl.normalize_args([repr(value)]) == [value]
    assert turnrl.compare_args({"a": x}, {"a": "8.000015258789063"}).kind == "mismatch"
    turns = [
        {
            "role": "assistant",
            "tool_calls": [{"name": "pay", "arguments": json.dumps({"amount": x})}],
        },
        {"role": "tool", "content": "ok"},
    ]
    gold = [{"name": "pay", "arguments": {"amount": repr(x)}}]
    assert turnrl.label_tiers(turns, gold, {"pay": "write"}).tiers == ["gold", None]


def _halfway_float(p: int, r: int) -> float:
    """k / 2**(p+1), odd k: halfway between two decimals with p fraction
    digits, both of which read back as it when k >= 2**53 / 5**p."""
    lo = 2**53 // 5**p
    return ((lo + r % (2**53 - lo)) | 1) / 2 ** (p + 1)


FLOAT_BITS = st.integers(0, 2**64 - 1).map(lambda b: struct.unpack("<d", struct.pack("<Q", b))[0])
TIE_PRONE = st.builds(_halfway_float, st.integers(1, 24), st.integers(0, 2**53))


@settings(max_examples=1500, deadline=None)
@given(FLOAT_BITS | TIE_PRONE | TIE_PRONE.map(lambda x: -x))
def test_floats_compare_by_the_digits_python_prints(x: float) -> None:
    if not math.isfinite(x):
        return
    printed = format(Decimal(repr(x)), "f")  # repr's digits, without an exponent
    assert turnrl.compare_args({"a": x}, {"a": printed}).kind == "exact", repr(x)
    assert turnrl.compare_args(printed, x).kind == "exact", repr(x)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_label_tiers_matches_reference(data: st.DataObject) -> None:
    tasks = _cached_tasks()
    gold = data.draw(st.sampled_from(tasks))
    pool = [
        *gold,
        {"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}},
        {"name": "nope", "arguments": {}},
    ]
    calls = data.draw(
        st.lists(
            st.sampled_from(pool).flatmap(
                lambda a: perturbed(a["arguments"], 0.05).map(
                    lambda args, a=a: {"name": a["name"], "arguments": args}
                )
            ),
            max_size=8,
        )
    )
    results = data.draw(
        st.lists(
            st.sampled_from(["{}", "ok", "Error: x"]), min_size=len(calls), max_size=len(calls)
        )
    )
    turns = trajectory(calls, results)
    labels = turnrl.label_tiers(turns, gold, AIRLINE_TOOLS)
    want_tiers, want_matched = ref.label_tiers(turns, gold, AIRLINE_TOOLS)
    assert labels.tiers == want_tiers
    assert labels.matched_gold == want_matched


_TASKS: list[list[dict[str, Any]]] = []


def _cached_tasks() -> list[list[dict[str, Any]]]:
    if not _TASKS:
        _TASKS.extend(t for t in airline_tasks() if t)
    return _TASKS


def test_tier_labels_repr() -> None:
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "hi"}]
    labels = turnrl.label_tiers(turns, [], {})
    assert repr(labels) == "TierLabels(tiers=[None, 'respond'], matched_gold=[])"


@pytest.mark.parametrize("depth", [50, 150, 255])
def test_deep_values_match_reference(depth: int) -> None:
    """Alternating dict/list nesting close to the depth limit, with a numeric
    string, padding and a changed leaf at the bottom."""

    def build(leaf: Any, n: int) -> Any:
        value = leaf
        for level in range(n):
            value = {"k": value, "n": level} if level % 2 else [value, " x "]
        return value

    gold = build({"a": 1, "b": "B", "c": 3}, depth)
    pred = build({"a": "1", "b": "b", "c": 4}, depth)
    got = as_dict(turnrl.compare_args(pred, gold))
    want = ref.compare(pred, gold)
    assert got == want
    assert got["kind"] == "soft" and len(got["diffs"]) == 2
    folded = turnrl.compare_args(pred, gold, case_fold=True)
    assert folded.diffs == [want["diffs"][1]]


def test_numpy_values_compare_as_the_python_values_numpy_gives() -> None:
    import numpy as np

    gold = {"ok": True, "price": 0.5, "n": 3, "seats": [1, 2], "flag": False}
    pred = {
        "ok": np.bool_(True),
        "price": np.float32(0.5),
        "n": np.int16(3),
        "seats": np.array([1, 2]),
        "flag": np.False_,
    }
    assert turnrl.compare_args(pred, gold).kind == "exact"
    assert turnrl.normalize_args(pred) == turnrl.normalize_args(gold)
    turns = [{"role": "assistant", "tool_calls": [{"name": "book", "arguments": pred}]}]
    labels = turnrl.label_tiers(turns, [{"name": "book", "arguments": gold}], {"book": "write"})
    assert labels.tiers == ["gold"]
    with pytest.raises(InvalidInputError, match=r"a decimal\.Decimal is not JSON"):
        turnrl.compare_args({"x": __import__("decimal").Decimal(1)}, {})


def test_tool_results_given_as_content_parts_are_read_as_text() -> None:
    call = {"name": "get", "arguments": {"id": "a"}}
    for content, tier in (
        ([{"type": "text", "text": "Error: no such user"}], "error"),
        ([{"type": "text", "text": "  "}, {"type": "text", "text": "Error"}], "error"),
        ([{"type": "text", "text": '{"name": "Mia"}'}], "read"),
        ([], "read"),
    ):
        turns = [
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "name": "get", "content": content},
        ]
        assert turnrl.label_tiers(turns, [], {"get": "read"}).tiers == [tier, None]
        assert ref.label_tiers(turns, [], {"get": "read"})[0] == [tier, None]


def test_unordered_paths_that_can_never_match_are_errors() -> None:
    # A mistyped path used to be ignored, leaving its lists ordered.
    for entry, hint in (("$.reservation.flights", "reservation.flights"), ("legs[0].seats", None)):
        with pytest.raises(InvalidInputError, match="can never match") as info:
            turnrl.compare_args({}, {}, unordered_keys=[entry])
        if hint:
            assert f'did you mean "{hint}"' in str(info.value)
    with pytest.raises(InvalidInputError, match="is not a path"):
        turnrl.normalize_args({}, unordered_keys=["a..b"])
    ok = turnrl.compare_args(
        {"legs": [{"s": [2, 1]}]}, {"legs": [{"s": [1, 2]}]}, unordered_keys=["legs[*].s"]
    )
    assert ok.kind == "exact"


# ---------------------------------------------------------------------------
# Reading without holding references (plain types) and the fallback that
# holds them (everything else): same answers, and nothing read after Python
# code ran can dangle.


class _Tag(str):
    pass


class _Count(int):
    pass


@pytest.mark.parametrize(
    ("unusual", "plain"),
    [
        ({"n": 2**63}, {"n": 2**63}),
        ({"n": -(2**63)}, {"n": str(-(2**63))}),
        ({"n": 2**64 - 1}, {"n": str(2**64 - 1)}),
        ({"n": -(2**100)}, {"n": str(-(2**100))}),
        ({"n": -1}, {"n": "-1"}),
        ({"t": ("a", 1)}, {"t": ["a", 1]}),
        (__import__("collections").OrderedDict(b=1, a="x"), {"a": "x", "b": 1}),
        ({"s": _Tag(" JFK ")}, {"s": "JFK"}),
        ({_Tag("k"): 1}, {"k": 1}),
        ({"c": _Count(7)}, {"c": 7}),
        ({"e": __import__("enum").IntEnum("E", "A B").B}, {"e": 2}),
    ],
)
def test_unusual_types_compare_as_their_plain_values(unusual: Any, plain: dict) -> None:
    # A plain part before and after the unusual one: reading gives up midway.
    pred = {"before": "x" * 40, "v": unusual, "after": [1, "y"]}
    gold = {"before": "x" * 40, "v": plain, "after": [1, "y"]}
    assert as_dict(turnrl.compare_args(pred, gold)) == as_dict(turnrl.compare_args(gold, gold))
    assert turnrl.compare_args(gold, pred).kind == "exact"
    assert turnrl.normalize_args(pred) == turnrl.normalize_args(gold)
    changed = {**gold, "after": [2, "y"]}
    assert turnrl.compare_args(pred, changed).diffs == ["after[0]"]


def test_errors_after_giving_up_still_name_the_path() -> None:
    with pytest.raises(InvalidInputError, match=r"pred\.a\[1\]: string is not valid UTF-8"):
        turnrl.compare_args({"a": ["ok", "\ud800"]}, {})
    with pytest.raises(InvalidInputError, match=r"gold\.x\.y: key 3 of type int is not a string"):
        turnrl.compare_args({"z": 1}, {"x": {"y": {"b": 1, 3: 1}}})
    with pytest.raises(InvalidInputError, match=r"gold\.n: a set is not JSON"):
        turnrl.compare_args({"n": 1}, {"n": {1}})


class _Mutating:
    """An integer-like whose conversion replaces the strings read before it
    (the only references to them) and collects garbage: text borrowed from
    them without a reference would be freed memory by the time it is
    compared."""

    def __init__(self, holder: list[Any]) -> None:
        self.holder = holder

    def __index__(self) -> int:
        for i, item in enumerate(self.holder):
            if isinstance(item, str):
                self.holder[i] = None
        import gc

        gc.collect()
        # Reuse the freed memory with different bytes.
        self.garbage = ["#" * 3000 + str(i) for i in range(200)]
        return 5


def test_python_code_run_while_reading_cannot_free_what_was_read() -> None:
    for _ in range(20):
        texts = ["".join(["q"] * 3000) + str(i) for i in range(8)]
        gold = [*(t[:] for t in texts), 5]
        pred: list[Any] = [*("".join(t) for t in texts)]
        pred.append(_Mutating(pred))
        got = turnrl.compare_args(pred, gold)
        # The strings were read before the conversion replaced them.
        assert got.kind == "exact", got.diffs
        assert pred[:8] == [None] * 8


@pytest.mark.parametrize(
    "text",
    ["", "a", "JFK", "x\x00y", "caf\u00e9", "\u03a3\u03c3", "\U0001f600 ok", "abc" * 1000],
)
def test_every_string_representation_reads_the_same(text: str) -> None:
    # CPython stores ASCII, Latin-1, UCS-2 and UCS-4 text differently (and
    # subclasses apart from their header); all must read as the same text.
    forms = [text, f" {text} ".strip(), _Tag(text), json.loads(json.dumps(text))]
    gold = {"k": text, "n": [text]}
    for form in forms:
        pred = {"k": form, "n": [form]}
        assert turnrl.normalize_args(pred) == ref.normalize(gold)
        assert turnrl.compare_args(pred, gold).kind == "exact"
        other = {"k": form + "!", "n": [form]}
        assert turnrl.compare_args(other, gold).diffs == ["k"]


def test_a_garbage_collection_while_giving_up_reads_the_changed_inputs_afresh() -> None:
    # Reading a lone surrogate raises inside CPython, and allocating that
    # exception may start a collection, whose callbacks run in the middle of
    # the read: here one frees every string read so far (their only
    # references) and changes the input. What was read before must be
    # dropped unread, and the comparison must see the inputs as they now are.
    import gc

    state: dict[str, Any] = {}

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase != "start" or "pred" not in state:
            return
        pred, gold = state.pop("pred"), state.pop("gold")
        pred[:] = [None] * len(pred)
        gold[-1] = "fixed"
        state["junk"] = ["#" * 3000 + str(i) for i in range(200)]
        state["ran"] = True

    gc.callbacks.append(callback)
    threshold = gc.get_threshold()
    try:
        ran = 0
        for _ in range(20):
            pred: list[Any] = ["".join(["q"] * 3000) + str(i) for i in range(8)]
            gold: list[Any] = [text[:] for text in pred] + ["\ud800"]
            state.clear()
            state.update(pred=pred, gold=gold)
            gc.set_threshold(1)
            try:
                got = turnrl.compare_args(pred, gold)
            except InvalidInputError as err:
                # No collection started before the surrogate was read.
                assert "not valid UTF-8" in str(err)
                continue
            finally:
                gc.set_threshold(*threshold)
            ran += state.get("ran", False)
            assert pred == [None] * 8
            want = ref.compare([None] * 8, [*gold[:8], "fixed"])
            assert (got.kind, got.diffs) == (want["kind"], want["diffs"])
        assert ran, "no collection ran while reading: the test did not test anything"
    finally:
        gc.callbacks.remove(callback)

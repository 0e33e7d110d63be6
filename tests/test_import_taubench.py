"""`turnrl rollouts import-taubench`: tau-bench results in, labelled buffer out;
and the conversion under it (`taubench_to_records`) on malformed entries."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from turnrl.cli import main
from turnrl.exceptions import InvalidInputError
from turnrl.importers import import_taubench
from turnrl.rollouts import (
    iter_rollout_records,
    read_rollouts,
    read_taubench_results,
    taubench_to_records,
    write_taubench_buffer,
)

TAU_BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "tau-bench"
needs_tau_bench = pytest.mark.skipif(not TAU_BENCH.is_dir(), reason="needs ../shared/tau-bench")
TAU2_BENCH = TAU_BENCH.parent / "tau2-bench"
needs_tau2_bench = pytest.mark.skipif(not TAU2_BENCH.is_dir(), reason="needs ../shared/tau2-bench")


def call(call_id: str, name: str, arguments: dict) -> dict:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def entry(task_id: int, reward: float, trial: int, assistant_calls: list[list[dict]]) -> dict:
    """A results entry in tau-bench's format: system, user, then per
    assistant message its tool calls and one tool reply per call."""
    traj = [{"role": "system", "content": "policy"}, {"role": "user", "content": "hi"}]
    for calls in assistant_calls:
        traj.append(
            {"role": "assistant", "content": None if calls else "done", "tool_calls": calls or None}
        )
        for c in calls:
            traj.append(
                {
                    "role": "tool",
                    "tool_call_id": c["id"],
                    "name": c["function"]["name"],
                    "content": "ok",
                }
            )
    return {"task_id": task_id, "reward": reward, "info": {}, "traj": traj, "trial": trial}


@needs_tau_bench
def test_import_labels_tiers_against_gold(tmp_path: Path):
    from turnrl import envs

    domain = envs.load("taubench:airline", root=TAU_BENCH)
    gold = domain.tasks[0].gold_actions[0]
    wrong = json.loads(json.dumps(gold))
    wrong["arguments"]["insurance"] = "yes"  # one leaf of many differs: soft
    results = [
        entry(
            0,
            1.0,
            0,
            [
                [call("a", "get_user_details", {"user_id": "mia_li_3668"})],
                [call("b", gold["name"], gold["arguments"])],
                [],
            ],
        ),
        entry(
            0,
            0.0,
            1,
            [[call("c", wrong["name"], wrong["arguments"])], [call("d", "no_such_tool", {})], []],
        ),
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "buffer.jsonl"
    assert (
        main(
            [
                "rollouts",
                "import-taubench",
                str(path),
                "--env",
                "taubench:airline",
                "--root",
                str(TAU_BENCH),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    records = list(iter_rollout_records(out))
    tiers = [[t["tier"] for t in r["turns"] if t["role"] == "assistant"] for r in records]
    assert tiers == [["read", "gold", "respond"], ["soft", "error", "respond"]]
    assert records[0]["task_id"] == "airline/test/0" and records[1]["sample"] == 1
    rewards = [t["reward"] for t in records[0]["turns"] if t["role"] == "assistant"]
    assert rewards == [0.3, 1.0, 0.0]  # the naive preset
    batch = read_rollouts(out)
    assert batch.num_trajectories == 2 and batch.skipped == 0


@needs_tau_bench
def test_a_tier_the_reward_table_lacks_names_the_entry(tmp_path: Path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([entry(0, 1.0, 0, [[]]), entry(1, 0.0, 0, [[]])]))
    tiers = tmp_path / "tiers.toml"
    tiers.write_text("[tiers]\ngold = 1.0\nread = 0.3\n")  # no respond
    out = tmp_path / "b.jsonl"
    argv = ["rollouts", "import-taubench", str(path), "--env", "taubench:airline"]
    assert main([*argv, "--root", str(TAU_BENCH), "--tiers", str(tiers), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"turnrl rollouts import-taubench: error: {path}: entry 0 (task_id 0): tier 'respond' "
        "has no reward in the tier table (its tiers: gold, read)\n"
    )
    assert not out.exists()


@needs_tau_bench
def test_an_import_without_assistant_turns_says_so(tmp_path: Path, capsys):
    """It printed "assistant turns by tier: " and nothing after it."""
    path, out = tmp_path / "results.json", tmp_path / "b.jsonl"
    argv = ["rollouts", "import-taubench", str(path), "--env", "taubench:airline"]
    argv += ["--root", str(TAU_BENCH), "--out", str(out)]
    user_only = {"task_id": 0, "reward": 0.0, "traj": [{"role": "user", "content": "hi"}]}
    for results, wrote in (([], "wrote 0 rollouts"), ([user_only], "wrote 1 rollouts")):
        path.write_text(json.dumps(results))
        assert main(argv) == 0
        assert capsys.readouterr().out == f"{wrote} to {out}; no assistant turns\n"
        assert len(read_rollouts(out).outcome) == len(results)


@needs_tau_bench
def test_an_out_that_is_the_results_file_is_refused(tmp_path: Path, capsys, monkeypatch):
    """--out naming the results file (by another path to it too) replaced the
    results with the buffer made from them."""
    path = tmp_path / "results.json"
    path.write_text(json.dumps([entry(0, 1.0, 0, [[]])]))
    before = path.read_bytes()
    (tmp_path / "link.json").symlink_to(path)
    monkeypatch.chdir(tmp_path)
    argv = ["rollouts", "import-taubench", str(path), "--env", "taubench:airline"]
    for out in (str(path), "results.json", "./link.json"):
        assert main([*argv, "--root", str(TAU_BENCH), "--out", out]) == 2
        assert capsys.readouterr().err == (
            f"turnrl rollouts import-taubench: error: --out {out}: the buffer cannot replace "
            f"the results file it is made from ({path})\n"
        )
        assert path.read_bytes() == before
    with pytest.raises(InvalidInputError, match="cannot replace the results file"):
        write_taubench_buffer("results.json", "link.json")
    assert path.read_bytes() == before


@needs_tau_bench
def test_a_reward_the_buffer_cannot_hold_names_its_entry_and_task(tmp_path: Path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([entry(0, 1.0, 0, [[]]), entry(1, 1e101, 0, [[]])]))
    with pytest.raises(InvalidInputError, match=r"entry 1 \(task 1\): 'reward' 1e\+101"):
        import_taubench(path, tmp_path / "b.jsonl", "taubench:airline", root=TAU_BENCH)
    assert not (tmp_path / "b.jsonl").exists()


@needs_tau_bench
def test_an_integer_reward_too_big_for_a_float_names_its_entry(tmp_path: Path, capsys):
    # JSON integers have no limit; math.isfinite raised OverflowError on them.
    good = json.dumps(entry(0, 1.0, 0, [[]]))
    huge = "1" + "0" * 400
    bad = json.dumps(entry(1, 0.0, 0, [[]])).replace('"reward": 0.0', f'"reward": {huge}')
    path = tmp_path / "results.json"
    path.write_text(f"[{good}, {bad}]")
    out = tmp_path / "b.jsonl"
    args = ["rollouts", "import-taubench", str(path), "--env", "taubench:airline"]
    assert main([*args, "--root", str(TAU_BENCH), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "results.json: entry 1 (task 1): 'reward' 10000000000" in err, err
    assert "is not a finite number of at most 1e100 in size" in err
    assert not out.exists()
    # More digits than Python converts to an int: refused as JSON.
    path.write_text(f"[{good}, {bad.replace(huge, '1' + '0' * 5000)}]")
    assert main([*args, "--root", str(TAU_BENCH), "--out", str(out)]) == 2
    assert "results.json: invalid JSON: Exceeds the limit" in capsys.readouterr().err
    # A message's reward too.
    # 10**5000 has more digits than Python writes: the message must not need them.
    for reward in (10**400, -(10**400), 10**5000, 1e101, math.inf, math.nan):
        message = {"role": "assistant", "content": "x", "reward": reward}
        with pytest.raises(InvalidInputError, match=r"entry 0 \(task_id 3\): traj\[0\]: 'reward'"):
            taubench_to_records([{"task_id": 3, "reward": 1.0, "traj": [message]}])
    message = {"role": "assistant", "content": "x", "reward": 10**100}
    (record,) = taubench_to_records([{"task_id": 3, "reward": 1.0, "traj": [message]}])
    assert record["turns"][0]["reward"] == 1e100
    with pytest.raises(InvalidInputError, match="an integer of about 5001 digits"):
        taubench_to_records([{"task_id": 3, "reward": 10**5000, "traj": []}])


@needs_tau_bench
def test_a_message_the_labelling_refuses_names_the_file_and_entry(tmp_path: Path, capsys):
    results = [
        entry(t, 1.0, 0, [[call("a", "get_user_details", {"user_id": "x"})], []]) for t in range(5)
    ]
    results[2]["traj"][1]["content"] = "PLACEHOLDER"
    # A lone surrogate escape: valid JSON, but no UTF-8 text (nor buffer) can hold it.
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results).replace("PLACEHOLDER", "broken emoji \\ud83d"))
    out = tmp_path / "b.jsonl"
    args = ["rollouts", "import-taubench", str(path), "--env", "taubench:airline"]
    assert main([*args, "--root", str(TAU_BENCH), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: entry 2 (task_id 2): turns[0].content: string is not valid UTF-8" in err, err
    assert not out.exists()


@needs_tau2_bench
def test_tau2_results_name_tasks_by_id_not_position(tmp_path: Path):
    from turnrl import envs

    domain = envs.load("tau2:airline", root=TAU2_BENCH, split="test")
    ids = [t.facts["tau2_id"] for t in domain.tasks]
    assert ids[:3] == ["2", "6", "8"]  # ids are not positions
    # Task "6"'s gold call; the split's task at position 6 ("19") has others.
    (gold,) = domain.task("airline/test/6").gold_actions
    assert gold not in domain.tasks[6].gold_actions
    results = [entry(0, 1.0, 0, [[call("a", gold["name"], gold["arguments"])], []])]
    results += [entry(0, 1.0, 0, [[]]) for _ in range(2)]
    for e, task_id in zip(results, ["6", "2", "22"], strict=True):
        e["task_id"] = task_id
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "b.jsonl"
    import_taubench(path, out, "tau2:airline", root=TAU2_BENCH, split="test")
    records = list(iter_rollout_records(out))
    assert [r["task_id"] for r in records] == [
        "airline/test/6",
        "airline/test/2",
        "airline/test/22",
    ]
    # Labelled against that task's gold actions.
    assert [t["tier"] for t in records[0]["turns"] if t["role"] == "assistant"] == [
        "gold",
        "respond",
    ]
    # An id that is not in the split (tau2's task 0 is in train), and an
    # integer that is the id of one task and the position of another.
    for task_id, message in [
        ("0", r"entry 0: task_id '0' is not the id of a task in tau2:airline's split"),
        (
            6,
            r"entry 0: task_id 6 is ambiguous: tau2 task '6' is airline/test/6, but the "
            r"split's task at position 6 is airline/test/19",
        ),
    ]:
        results[0]["task_id"] = task_id
        path.write_text(json.dumps(results))
        with pytest.raises(InvalidInputError, match=message):
            import_taubench(path, out, "tau2:airline", root=TAU2_BENCH, split="test")
    # An integer that is no position of the split is the id it names.
    results[0]["task_id"] = 22
    path.write_text(json.dumps(results[:1]))
    import_taubench(path, out, "tau2:airline", root=TAU2_BENCH, split="test")
    assert [r["task_id"] for r in iter_rollout_records(out)] == ["airline/test/22"]


def test_import_rejects_unknown_task_index(tmp_path: Path, capsys):
    path = tmp_path / "results.json"
    argv = ["rollouts", "import-taubench", str(path), "--env", "taubench:airline"]
    argv += ["--root", str(TAU_BENCH), "--out", str(tmp_path / "b.jsonl")]
    # An index past the split says so (it read "is not a task index", as a name does).
    for task_id, message in (
        (999, "entry 0: taubench:airline: task index 999 out of range (0..49)"),
        ("first", "entry 0: task_id 'first' is not a task index"),
    ):
        path.write_text(json.dumps([entry(task_id, 1.0, 0, [[]])]))
        assert main(argv) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "b.jsonl").exists()


def raw_call(call_id: str, name: str, arguments_text: str) -> dict:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments_text},
    }


@pytest.mark.parametrize(
    ("tool_calls", "where"),
    [
        (["x"], r"tool_calls\[0\]: expected an object, got str"),
        ({"id": "a", "function": {}}, r"'tool_calls' must be a list, got dict"),
        ("get_user_details", r"'tool_calls' must be a list, got str"),
        (
            [raw_call("a", "f", "{}"), {"id": "b", "function": "get_user_details"}],
            r"tool_calls\[1\]: 'function' must be an object, got str",
        ),
    ],
)
def test_malformed_tool_calls_name_the_entry_message_and_call(tmp_path, tool_calls, where):
    good = entry(4, 1.0, 0, [[]])
    bad = entry(7, 0.0, 0, [[]])
    bad["traj"][2]["tool_calls"] = tool_calls
    path = tmp_path / "results.json"
    path.write_text(json.dumps([good, bad]))
    pattern = rf"results\.json: entry 1 \(task_id 7\): traj\[2\]: {where}"
    with pytest.raises(InvalidInputError, match=pattern):
        read_taubench_results(path)
    with pytest.raises(InvalidInputError, match=pattern):
        write_taubench_buffer(path, tmp_path / "b.jsonl")
    assert not (tmp_path / "b.jsonl").exists()


@pytest.mark.parametrize(
    "text",
    [
        '{"x": NaN}',
        '{"x": Infinity}',
        '{"x": -Infinity}',
        '{"x": 1e999}',
        '{"x": [1, -1e400]}',
        '{"x": "\\ud800"}',  # a lone surrogate, which no UTF-8 buffer can hold
        "{not json",
    ],
)
def test_arguments_that_are_not_strict_json_stay_raw(tmp_path, text):
    calls = [raw_call("a", "f", text), raw_call("b", "f", '{"y": 1.5, "z": [1e300]}')]
    path = tmp_path / "results.json"
    path.write_text(json.dumps([entry(0, 1.0, 0, [calls, []])]))
    (record,) = read_taubench_results(path)
    arguments = [c["arguments"] for c in record["turns"][1]["tool_calls"]]
    assert arguments == [text, {"y": 1.5, "z": [1e300]}]
    out = tmp_path / "b.jsonl"
    assert write_taubench_buffer(path, out) == 1
    assert list(iter_rollout_records(out)) == [record]


def test_arguments_objects_a_record_cannot_hold_become_their_json_text():
    nan_args = {"x": math.nan}
    results = [entry(0, 1.0, 0, [[raw_call("a", "f", "{}")]])]
    results[0]["traj"][2]["tool_calls"][0]["function"]["arguments"] = nan_args
    (record,) = taubench_to_records(results)
    assert record["turns"][1]["tool_calls"][0]["arguments"] == '{"x": NaN}'


def test_task_id_must_be_an_index_or_a_name():
    for task_id in (None, True, 1.5, [1], ""):
        bad = entry(0, 1.0, 0, [[]])
        bad["task_id"] = task_id
        with pytest.raises(InvalidInputError, match=r"entry 1: 'task_id' must be an integer"):
            taubench_to_records([entry(0, 1.0, 0, [[]]), bad])
    assert taubench_to_records([entry(0, 1.0, 0, [[]])], "airline")[0]["task_id"] == "airline/0"


def test_every_trajectory_of_a_task_gets_a_distinct_sample():
    def no_trial(task_id: int) -> dict:
        e = entry(task_id, 0.0, 0, [[]])
        del e["trial"]
        return e

    results = [
        entry(1, 1.0, 0, [[]]),
        no_trial(1),  # 0 is taken by a trial, 1 by a later one: 2
        entry(1, 1.0, 1, [[]]),
        entry(1, 1.0, 1, [[]]),  # trial 1 again: the next free number, 3
        no_trial(2),
        entry(2, 1.0, 0, [[]]),  # trial 0 is free: the entry without a trial took 1
        entry(3, 1.0, 2**63, [[]]),  # a trial no buffer can hold is no trial
    ]
    records = taubench_to_records(results)
    assert [(r["task_id"], r["sample"]) for r in records] == [
        ("1", 0),
        ("1", 2),
        ("1", 1),
        ("1", 3),
        ("2", 1),
        ("2", 0),
        ("3", 0),
    ]
    assert [r["meta"]["trial"] for r in records] == [0, None, 1, 1, None, 0, None]


@needs_tau_bench
def test_import_keeps_every_trajectory_when_a_call_has_nan_arguments(tmp_path: Path):
    results = [
        entry(0, 1.0, 0, [[call("a", "get_user_details", {"user_id": "mia_li_3668"})], []]),
        entry(0, 0.0, 1, [[raw_call("b", "get_user_details", '{"user_id": NaN}')], []]),
        entry(1, 0.0, 0, [[raw_call("c", "get_reservation_details", '{"x": 1e999}')], []]),
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "buffer.jsonl"
    summary = import_taubench(path, out, "taubench:airline", root=TAU_BENCH)
    assert summary.records == 3
    records = list(iter_rollout_records(out))
    assert [r["task_id"] for r in records] == ["airline/test/0"] * 2 + ["airline/test/1"]
    assert [r["sample"] for r in records] == [0, 1, 0]
    odd = [r["turns"][1]["tool_calls"][0]["arguments"] for r in records[1:]]
    assert odd == ['{"user_id": NaN}', '{"x": 1e999}']
    assert read_rollouts(out).skipped == 0


def test_a_results_file_with_a_byte_order_mark_reads(tmp_path: Path):
    results = [entry(0, 1.0, 0, [[raw_call("a", "f", '{"x": 1}')]])]
    plain, marked = tmp_path / "plain.json", tmp_path / "marked.json"
    plain.write_text(json.dumps(results), encoding="utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert read_taubench_results(marked) == read_taubench_results(plain)


def test_imported_calls_keep_their_ids_in_the_rebuilt_chat():
    # tau-bench keeps each call's id in the call; its result names it.
    from turnrl.train import rollout_messages

    entry = {
        "task_id": 0,
        "reward": 1.0,
        "info": {},
        "trial": 0,
        "traj": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_XYZ",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"a": 1}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_XYZ", "name": "f", "content": "ok"},
            {"role": "assistant", "content": "done"},
        ],
    }
    chat = rollout_messages(taubench_to_records([entry])[0], "S")
    assert chat[2]["tool_calls"][0]["id"] == chat[3]["tool_call_id"] == "call_XYZ"

"""`turnrl rollouts import-taubench`: tau-bench results in, labelled buffer out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from turnrl.cli import main
from turnrl.rollouts import iter_rollout_records, read_rollouts

TAU_BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "tau-bench"
pytestmark = pytest.mark.skipif(not TAU_BENCH.is_dir(), reason="needs ../shared/tau-bench")


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


def test_import_rejects_unknown_task_index(tmp_path: Path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps([entry(999, 1.0, 0, [[]])]))
    code = main(
        [
            "rollouts",
            "import-taubench",
            str(path),
            "--env",
            "taubench:airline",
            "--root",
            str(TAU_BENCH),
            "--out",
            str(tmp_path / "b.jsonl"),
        ]
    )
    assert code == 2
    assert "entry 0" in capsys.readouterr().err
    assert not (tmp_path / "b.jsonl").exists()

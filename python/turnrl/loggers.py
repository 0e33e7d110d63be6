"""Per-step training statistics sent to experiment trackers.

``turnrl train`` always writes ``OUT/metrics.jsonl``; people coming from TRL
(``report_to``) or verl (``trainer.logger``) expect the same figures in
TensorBoard or Weights & Biases as well, next to their other runs. A logger
here takes what ``train_loop``'s ``on_step`` gets (the absolute step and its
stats) and is closed at the end of the run.

Loggers are picked by name from a registry (``tensorboard``, ``wandb``), as
estimators are. The trackers' packages are optional and imported only when
their logger is made, so ``import turnrl`` stays light and a missing package
is reported with the ``pip install`` that fixes it.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from turnrl.exceptions import InvalidInputError, UnknownNameError

__all__ = [
    "STEP_METRIC",
    "WANDB_RUN_ID_FILE",
    "LoggerRun",
    "StepLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "close_loggers",
    "logger_names",
    "make_loggers",
    "measured_stats",
    "require_loggers",
]

# Where make_loggers keeps the W&B run's id in the output folder, so that a
# resumed training run goes on logging to the same W&B run.
WANDB_RUN_ID_FILE = "wandb_run_id"

# The W&B metric every other one is charted against: train_loop's step.
STEP_METRIC = "step"

# The extra that installs every tracker.
_EXTRA = "pip install 'turnrl[tracking]'"


@runtime_checkable
class StepLogger(Protocol):
    """What a tracker gets from training: a call per step, one more per
    evaluation (its ``eval/`` figures, at the step it followed), then ``close``."""

    def log(self, step: int, stats: Mapping[str, float]) -> None:
        """Record one step's statistics at ``step`` (the run's absolute step)."""

    def close(self) -> None:
        """Flush and release the tracker; called once, after the last step."""


def measured_stats(stats: Mapping[str, float | None]) -> dict[str, float]:
    """``stats`` as floats, without the statistics that were not measured
    (None or NaN: a step where no row ran has no loss statistics). Trackers
    would draw those as 0 or break the line; leaving them out shows a gap."""
    kept: dict[str, float] = {}
    for key, value in stats.items():
        if value is None:
            continue
        number = float(value)
        if not math.isnan(number):
            kept[key] = number
    return kept


def _import_for(logger: str, module: str, package: str) -> ModuleType:
    """``module``, or an error naming the logger that needs it and what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise InvalidInputError(
            f"the {logger} logger needs the {package} package ({e}): pip install {package}, "
            f"or {_EXTRA}"
        ) from None


class TensorBoardLogger:
    """Statistics as TensorBoard scalars in ``log_dir``, one tag per statistic.

    Tags are the statistics' names, so ``tier_reward/gold`` and the other
    ``tier_reward/<tier>`` share a group in TensorBoard. A resumed run writes
    a new event file in the same folder; its steps go on from the saved step,
    so TensorBoard shows one continuous run.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        tensorboard = _import_for("tensorboard", "torch.utils.tensorboard", "tensorboard")
        self.log_dir = Path(log_dir)
        self._writer = tensorboard.SummaryWriter(log_dir=str(self.log_dir))

    def log(self, step: int, stats: Mapping[str, float]) -> None:
        """One scalar per measured statistic at ``step`` (NaN and None left out)."""
        for tag, value in measured_stats(stats).items():
            self._writer.add_scalar(tag, value, global_step=step)
        # A run killed later still has this step on disk.
        self._writer.flush()

    def close(self) -> None:
        """Flush the event file and stop the writer."""
        self._writer.close()


class WandbLogger:
    """Statistics logged to a Weights & Biases run, at the training step.

    ``wandb`` is imported when the logger is made. Credentials, the entity
    and offline mode come from W&B's own settings (``wandb login``,
    ``WANDB_ENTITY``, ``WANDB_MODE``). With ``resume_id``, the logger goes on
    with that run (``resume="allow"``: a run that W&B does not know is
    started under that id); the id of the run it logs to is ``run_id``.
    """

    def __init__(
        self,
        project: str | None = None,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        dir: str | os.PathLike[str] | None = None,
        resume_id: str | None = None,
    ) -> None:
        self._wandb = _import_for("wandb", "wandb", "wandb")
        options: dict[str, Any] = {
            "project": project,
            "name": name,
            "config": dict(config) if config is not None else None,
            "dir": None if dir is None else str(dir),
        }
        if resume_id is not None:
            # A resumed run may change settings (a lower --lr after a spike):
            # its config replaces the saved values instead of being refused.
            options.update(id=resume_id, resume="allow", allow_val_change=True)
        self._run = self._wandb.init(**options)
        self.run_id: str = str(self._run.id)
        self._exit_code = 0
        # W&B's own step must only go up from 0, and drops what is logged
        # below it: the evaluation before training is logged at step -1, and
        # a resumed run's at its last saved step. So every chart is drawn
        # against the training step as a metric of its own.
        self._wandb.define_metric(STEP_METRIC)
        self._wandb.define_metric("*", step_metric=STEP_METRIC)

    def log(self, step: int, stats: Mapping[str, float]) -> None:
        """The measured statistics (NaN and None left out), with ``step`` as
        their x-axis (:data:`STEP_METRIC`)."""
        self._wandb.log({STEP_METRIC: step, **measured_stats(stats)})

    def mark_failed(self) -> None:
        """Record the run as failed when it is closed (W&B's "Failed" state)."""
        self._exit_code = 1

    def close(self) -> None:
        """Finish the W&B run (uploads what is left), failed or not."""
        self._wandb.finish(exit_code=self._exit_code)


@dataclass(frozen=True)
class LoggerRun:
    """What a logger factory is given about the training run."""

    out_dir: Path  # the run's output folder; loggers write under it
    config: Mapping[str, Any] = field(default_factory=dict)  # the run's settings
    name: str | None = None  # the run's name in trackers that name runs
    project: str | None = None  # the W&B project (None: W&B's default)
    resume: bool = False  # a resumed run: continue the trackers' runs


def _tensorboard(run: LoggerRun) -> StepLogger:
    return TensorBoardLogger(run.out_dir / "tensorboard")


def _wandb(run: LoggerRun) -> StepLogger:
    id_file = run.out_dir / WANDB_RUN_ID_FILE
    resume_id = None
    if run.resume and id_file.is_file():
        resume_id = id_file.read_text(encoding="utf-8").strip() or None
    logger = WandbLogger(
        project=run.project,
        name=run.name,
        config=run.config,
        dir=run.out_dir,
        resume_id=resume_id,
    )
    id_file.write_text(logger.run_id + "\n", encoding="utf-8")
    return logger


# Logger name -> factory. The trackers' packages: (module imported, pip package).
_REGISTRY: dict[str, Callable[[LoggerRun], StepLogger]] = {
    "tensorboard": _tensorboard,
    "wandb": _wandb,
}
_PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}


def logger_names() -> list[str]:
    """The names :func:`make_loggers` takes."""
    return list(_REGISTRY)


def require_loggers(names: Sequence[str]) -> list[str]:
    """``names`` without repeats, once each is known and its package imports.

    ``turnrl train`` calls this before loading the model, so that a typo or
    a missing package fails at once instead of after the model has loaded.

    Raises:
        UnknownNameError: for an unknown name (the known ones are listed).
        InvalidInputError: for a logger whose package is not installed (with
            what to install).
    """
    unique = list(dict.fromkeys(names))
    unknown = [name for name in unique if name not in _REGISTRY]
    if unknown:
        raise UnknownNameError(
            f"unknown logger {', '.join(map(repr, unknown))}; "
            f"known loggers: {', '.join(logger_names())}"
        )
    for name in unique:
        if name in _PACKAGES:
            _import_for(name, *_PACKAGES[name])
    return unique


def make_loggers(
    names: Sequence[str],
    out_dir: str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
    *,
    run_name: str | None = None,
    project: str | None = None,
    resume: bool = False,
) -> list[StepLogger]:
    """The loggers named in ``names`` (see :func:`logger_names`) for a run
    writing to ``out_dir``.

    ``tensorboard`` writes to ``out_dir/tensorboard``. ``wandb`` logs to a run
    named ``run_name`` in ``project``, with ``config`` as its config, keeps its
    files in ``out_dir/wandb`` and its id in ``out_dir/wandb_run_id``; with
    ``resume``, it goes on with the run of that id. The caller closes them
    (:func:`close_loggers`).

    Raises:
        UnknownNameError, InvalidInputError: as :func:`require_loggers`.
    """
    unique = require_loggers(names)
    run = LoggerRun(
        Path(out_dir), dict(config or {}), name=run_name, project=project, resume=resume
    )
    if unique:
        run.out_dir.mkdir(parents=True, exist_ok=True)
    made: list[StepLogger] = []
    try:
        for name in unique:
            made.append(_REGISTRY[name](run))
    except BaseException:
        # The ones already started are not left open; the error raised is the first.
        with contextlib.suppress(Exception):
            close_loggers(made)
        raise
    return made


def close_loggers(loggers: Sequence[StepLogger], *, failed: bool = False) -> None:
    """Close every logger, even when one fails to; the first error is raised
    after the others are closed. ``failed``: the run ended in an error, which
    loggers that can record it are told first (``mark_failed``)."""
    first: BaseException | None = None
    for logger in loggers:
        try:
            mark_failed = getattr(logger, "mark_failed", None)
            if failed and mark_failed is not None:
                mark_failed()
            logger.close()
        except BaseException as e:
            first = first or e
    if first is not None:
        raise first

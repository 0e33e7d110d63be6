"""Turn-level advantage estimators, selected by name from a registry.

The built-in estimators (``grpo``, ``mt_grpo``, ``gtpo_hybrid``) run in the
Rust core: zero-copy on float64/int64 contiguous arrays, without the GIL, and
in parallel across groups for large batches. A Python estimator registered
with :func:`register_estimator` gets the same validated inputs and is called
the same way, so training code never branches on the estimator.

Ragged batches are passed flat (CSR): ``turn_rewards`` holds every turn of
every trajectory, ``turn_offsets[i]:turn_offsets[i + 1]`` are trajectory i's
turns, ``outcome[i]`` is its task reward and ``group[i]`` the id of the
group of rollouts sampled for the same task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from turnrl import _core
from turnrl.exceptions import InvalidInputError, UnknownNameError

__all__ = [
    "AdvantageBatch",
    "EstimatorFn",
    "broadcast_to_tokens",
    "compute_advantages",
    "estimator_names",
    "get_estimator",
    "make_batch",
    "probe_batch",
    "register_estimator",
]

ArrayLike = npt.ArrayLike


@dataclass(frozen=True)
class AdvantageBatch:
    """A validated ragged batch: contiguous float64/int64 arrays."""

    outcome: np.ndarray
    group: np.ndarray
    turn_rewards: np.ndarray
    turn_offsets: np.ndarray

    @property
    def num_trajectories(self) -> int:
        """Number of trajectories B."""
        return int(self.outcome.shape[0])

    @property
    def turn_counts(self) -> np.ndarray:
        """Turns per trajectory (K_i), length B."""
        return np.diff(self.turn_offsets)


class EstimatorFn(Protocol):
    """An estimator: a batch and keyword parameters in, one float64 per turn out."""

    def __call__(self, batch: AdvantageBatch, **params: Any) -> np.ndarray: ...


_REGISTRY: dict[str, EstimatorFn] = {}


def register_estimator(name: str) -> Callable[[EstimatorFn], EstimatorFn]:
    """Register ``fn`` as estimator ``name`` (decorator).

    ``fn`` gets the keyword parameters :func:`compute_advantages` is given
    as they are: ``norm`` among them when given, any string (the built-in
    names, ``"batch"`` included, are only a convention it may follow; the
    batch it gets is the whole call's, so ``"batch"`` statistics are its
    own to take; :func:`turnrl.train.train_loop` calls it on a step's
    trained rollouts, every rank's under torchrun). Re-registering the same
    function is a no-op; registering a different function under a taken
    name is an error.
    """

    def decorate(fn: EstimatorFn) -> EstimatorFn:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"estimator {name!r} is already registered to {existing!r}")
        _REGISTRY[name] = fn
        return fn

    return decorate


def get_estimator(name: str) -> EstimatorFn:
    """The estimator registered as ``name``; the error lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(sorted(_REGISTRY))
        raise UnknownNameError(f"unknown estimator {name!r}; expected one of: {valid}") from None


def estimator_names() -> list[str]:
    """Names of every registered estimator, built-in ones first."""
    return list(_REGISTRY)


def _rust_estimator(name: str) -> EstimatorFn:
    def run(batch: AdvantageBatch, **params: Any) -> np.ndarray:
        return _core.compute_advantages(
            name,
            batch.outcome,
            batch.group,
            batch.turn_rewards,
            batch.turn_offsets,
            **params,
        )

    run.__name__ = name
    run._validates_itself = True  # type: ignore[attr-defined]
    run.__doc__ = f"Built-in estimator {name!r} (Rust core)."
    return run


for _name, _summary in _core.estimators():
    register_estimator(_name)(_rust_estimator(_name))


def _as_array(value: ArrayLike, dtype: type, field: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 1:
        raise InvalidInputError(f"{field} must be one-dimensional, got shape {array.shape}")
    if array.dtype != dtype:
        if dtype is np.int64 and array.size and not np.issubdtype(array.dtype, np.integer):
            raise InvalidInputError(f"{field} must hold integers, got dtype {array.dtype}")
        array = array.astype(dtype)
    # A no-op (no copy) for arrays that are already contiguous.
    return np.ascontiguousarray(array)


def _convert(
    outcome: ArrayLike, group: ArrayLike, turn_rewards: ArrayLike, turn_offsets: ArrayLike
) -> AdvantageBatch:
    return AdvantageBatch(
        outcome=_as_array(outcome, np.float64, "outcome"),
        group=_as_array(group, np.int64, "group"),
        turn_rewards=_as_array(turn_rewards, np.float64, "turn_rewards"),
        turn_offsets=_as_array(turn_offsets, np.int64, "turn_offsets"),
    )


def make_batch(
    outcome: ArrayLike,
    group: ArrayLike,
    turn_rewards: ArrayLike,
    turn_offsets: ArrayLike,
) -> AdvantageBatch:
    """Convert and validate the four arrays of a ragged batch.

    Raises :class:`~turnrl.exceptions.InvalidInputError` (a ``ValueError``)
    naming the trajectory for mismatched lengths, bad offsets, NaN or inf.
    """
    batch = _convert(outcome, group, turn_rewards, turn_offsets)
    _core.validate_batch(batch.outcome, batch.group, batch.turn_rewards, batch.turn_offsets)
    return batch


def compute_advantages(
    estimator: str,
    outcome: ArrayLike,
    group: ArrayLike,
    turn_rewards: ArrayLike,
    turn_offsets: ArrayLike,
    **params: Any,
) -> np.ndarray:
    """Per-turn advantages of a ragged batch, in the layout of ``turn_rewards``.

    Args:
        estimator: a registered name: ``"grpo"``, ``"mt_grpo"``,
            ``"gtpo_hybrid"`` or one added with :func:`register_estimator`.
        outcome: task reward R[i] per trajectory, length B.
        group: group id per trajectory (any integers, any order), length B.
        turn_rewards: reward r[i, k] of every turn, trajectories concatenated.
        turn_offsets: length B + 1, from 0 to ``len(turn_rewards)``.
        **params: ``norm``: ``"std"`` (subtract the group's mean, divide
            by its sample std + ``eps``), ``"mean"`` (subtract the mean),
            ``"none"``, ``"rloo"`` (subtract the mean of the set's other
            values: ``n / (n - 1)`` times the deviation, no std) or
            ``"batch"`` (subtract the group's mean, divide by the sample std
            + ``eps`` of the same kind of raw values over the whole batch:
            every outcome, every turn-k value under ``turn_norm="position"``,
            every turn value under ``"pooled"``; TRL's
            ``scale_rewards="batch"``); ``eps``
            (1e-6; finite, >= 0), ``gamma`` (``gtpo_hybrid``: 0.9; a
            discount factor in [0, 1]), ``lam`` (``mt_grpo``: 1.0,
            ``gtpo_hybrid``: 0.3; at most 1e100 in size), ``turn_norm``
            (``"position"`` | ``"pooled"``).

    Returns:
        float64 array with one advantage per turn. Groups of one trajectory
        and constant sets normalise to 0, and so does a set whose std (under
        ``norm="batch"``, the batch's) is 0
        although its values differ (``eps=0`` and deviations whose squares
        underflow); no NaN or infinity is ever returned (rewards and
        outcomes must be finite and at most 1e100 in size, and ``lam`` at
        most 1e100, so that nothing can overflow).
    """
    fn = get_estimator(estimator)
    if getattr(fn, "_validates_itself", False):
        # Built-ins validate in Rust as they run: skip a second pass.
        return fn(_convert(outcome, group, turn_rewards, turn_offsets), **params)
    return fn(make_batch(outcome, group, turn_rewards, turn_offsets), **params)


def broadcast_to_tokens(
    turn_adv: ArrayLike, turn_offsets: ArrayLike, token_turn: ArrayLike
) -> np.ndarray:
    """Spread turn advantages onto a [B, T] token grid.

    ``token_turn[b, t]`` is the index (from 0) of the turn of trajectory b
    that generated token t, or -1 for tokens the model did not generate
    (prompt, tool results, user messages, padding), which get 0.

    It must have one row per trajectory (B = ``len(turn_offsets) - 1``),
    whatever its width, T = 0 included.

    The grid is per token; :func:`turnrl.kernels.gtpo_loss` takes values per
    position (``hidden[t]`` predicts token ``t + 1``), so pass it
    ``advantages[:, 1:]`` (and the mask and ids shifted the same way).
    """
    grid = np.asarray(token_turn)
    if grid.ndim != 2:
        raise InvalidInputError(f"token_turn must be [B, T], got shape {grid.shape}")
    if grid.dtype != np.int64:
        if grid.size and not np.issubdtype(grid.dtype, np.integer):
            raise InvalidInputError(f"token_turn must hold integers, got dtype {grid.dtype}")
        grid = grid.astype(np.int64)
    return _core.broadcast_to_tokens(
        _as_array(turn_adv, np.float64, "turn_adv"),
        _as_array(turn_offsets, np.int64, "turn_offsets"),
        np.ascontiguousarray(grid),
    )


def probe_batch() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A small fixed ragged batch (outcome, group, turn rewards, turn offsets) to
    try estimator settings on before real work: groups of 4 to 6, outcomes of
    0, 1 and in between, one to four turns per trajectory."""
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(3), [4, 5, 6])
    counts = rng.integers(1, 5, size=group.size)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    outcome = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=group.size)
    return outcome, group, rng.normal(size=int(offsets[-1])), offsets

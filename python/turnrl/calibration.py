"""Iterative Reward Calibration (IRC).

Each assistant turn carries a reward tier (gold, soft, read, write, error,
respond). IRC asks, for each tier, whether trajectories that contain it
succeed more or less often (the point-biserial correlation r_pb of tier
presence with success), sets the tier's reward proportional to r_pb (zero
when it does not discriminate), and checks that after group normalisation
the advantage on the tier's turns has the sign of r_pb, adjusting until it
does.

The statistics are integer sums (:class:`TierStats`), so shards of a buffer
reduce separately and merge exactly (``a + b``); the Rust core computes them
without the GIL.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import secrets
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from turnrl import _core
from turnrl.advantages import compute_advantages, probe_batch
from turnrl.exceptions import InvalidInputError, TurnrlIOError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "DEFAULT_TIERS",
    "PRESETS",
    "CalibrationReport",
    "Iteration",
    "OnlineCalibrator",
    "TierCorrelation",
    "TierDirection",
    "TierStats",
    "TieredRollouts",
    "calibrate",
    "direction_check",
    "load_tier_rewards",
    "rewards_from_correlations",
    "save_tier_rewards",
]

DEFAULT_TIERS: tuple[str, ...] = ("gold", "soft", "read", "write", "error", "respond")

#: Built-in tier reward tables. ``naive`` holds the paper's dense values for
#: read (+0.3) and write (+0.1) with the obvious values for the rest; ``sparse``
#: is outcome-only (every tier 0).
PRESETS: dict[str, dict[str, float]] = {
    "naive": {"gold": 1.0, "soft": 0.5, "read": 0.3, "write": 0.1, "error": -0.5, "respond": 0.0},
    "sparse": dict.fromkeys(DEFAULT_TIERS, 0.0),
}


# --------------------------------------------------------------------------
# Tier reward files


def _check_tier_name(where: object, tier: object) -> None:
    if not isinstance(tier, str):
        raise InvalidInputError(f"{where}: tier names must be strings, got {tier!r}")


def _checked_reward(where: object, tier: str, value: object) -> float:
    """``value`` as a reward: a finite number (not a bool), or a clear error
    naming ``where`` (the file or ``mapping``) and the tier."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"{where}: tier {tier!r} must map to a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidInputError(f"{where}: tier {tier!r} has a non-finite reward {value}")
    return float(value)


_BOM = b"\xef\xbb\xbf"


def load_tier_rewards(source: str | os.PathLike[str] | Mapping[str, float]) -> dict[str, float]:
    """Tier rewards from a preset name (``naive``, ``sparse``), a mapping, or a
    TOML file with a ``[tiers]`` table (or top-level ``tier = reward`` keys);
    a UTF-8 byte-order mark at the file's start is skipped.

    Raises:
        TurnrlIOError: the file does not exist.
        InvalidInputError: the file is not UTF-8 TOML, ``tiers`` is not a table, a
            file with a ``[tiers]`` table has other top-level keys, a tier name
            is not a string, a reward is not a finite number, or there are no
            tiers (the message names the file, or ``mapping``, and the key).
    """
    if isinstance(source, Mapping):
        table: Mapping[Any, Any] = source
        where = "mapping"
    elif str(source) in PRESETS and not Path(source).exists():
        return dict(PRESETS[str(source)])
    else:
        path = Path(source)
        where = str(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            presets = ", ".join(PRESETS)
            raise TurnrlIOError(f"{path}: no such tier file (or use a preset: {presets})") from None
        # A byte-order mark (some editors write one) is no content, as for
        # --config files and buffers; tomllib refuses it.
        text = data.removeprefix(_BOM)
        try:
            document = tomllib.loads(text.decode("utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise InvalidInputError(f"{path}: not valid TOML: {err}") from None
        except UnicodeDecodeError as err:  # TOML is UTF-8
            at = err.start + len(data) - len(text)  # the byte's place in the file
            raise InvalidInputError(f"{path}: not UTF-8 text ({err.reason} at byte {at})") from None
        if "tiers" in document:
            tiers = document["tiers"]
            if not isinstance(tiers, dict):
                raise InvalidInputError(
                    f"{path}: key 'tiers' must be a table of tier = reward "
                    f"(a [tiers] section), got {type(tiers).__name__} {tiers!r}"
                )
            others = [key for key in document if key != "tiers"]
            if others:
                raise InvalidInputError(
                    f"{path}: top-level keys {others} are outside the [tiers] table "
                    "(put every tier in [tiers], or drop the [tiers] header)"
                )
            table = tiers
        else:
            table = document
    rewards: dict[str, float] = {}
    for tier, value in table.items():
        _check_tier_name(where, tier)
        rewards[tier] = _checked_reward(where, tier, value)
    if not rewards:
        raise InvalidInputError(f"{where}: no tier rewards found")
    return rewards


def _calibration_rewards(source: str | os.PathLike[str] | Mapping[str, float]) -> dict[str, float]:
    """:func:`load_tier_rewards`, but an empty mapping is the empty table: every
    tier 0, as calibration counts a tier without a reward. A calibrator that
    re-derives its rewards before it has counted any tier holds that table,
    and must go on from it and read it back."""
    if isinstance(source, Mapping) and not source:
        return {}
    return load_tier_rewards(source)


def tier_reward(rewards: Mapping[str, float], tier: str, where: str) -> float:
    """``rewards[tier]``, the reward a turn of ``tier`` gets from a tier table. A
    tier the table lacks is an error naming ``where`` (the record), the tier and
    the table's tiers: counted 0 it would quietly drop the turns of a tier the
    table was meant to reward or penalise (a misspelt or forgotten key)."""
    try:
        return float(rewards[tier])
    except KeyError:
        listed = ", ".join(map(str, rewards)) or "none"
        raise InvalidInputError(
            f"{where}: tier {tier!r} has no reward in the tier table (its tiers: {listed})"
        ) from None


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# The characters a TOML basic string must escape: the quote, the backslash and
# the control characters U+0000-U+001F and U+007F (tab is escaped too).
_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
_TOML_SPECIAL = re.compile(r'["\\\x00-\x1f\x7f]')
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_COMMENT_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return _TOML_ESCAPES.get(char) or f"\\u{ord(char):04X}"


def _toml_key(name: str) -> str:
    """``name`` as a TOML key: bare when TOML allows (A-Za-z0-9_-, non-empty),
    else a basic string with ``"``, ``\\`` and control characters escaped."""
    if _BARE_KEY.fullmatch(name):
        return name
    return '"' + _TOML_SPECIAL.sub(_escape_char, name) + '"'


def save_tier_rewards(
    rewards: Mapping[str, float], path: str | os.PathLike[str], comment: str | None = None
) -> None:
    """Write tier rewards as TOML, atomically (a temporary file, then rename).

    Any tier name a string can hold round-trips through :func:`load_tier_rewards`
    (names that are not bare TOML keys are written quoted and escaped), except
    those with lone surrogates, which TOML cannot represent. ``comment`` lines
    are written as ``#`` comments at the top.

    Raises:
        InvalidInputError: no tiers, a tier name that is not a string or holds
            a lone surrogate, a reward that is not a finite number, or a
            comment with control characters other than tab and line breaks
            (the message names the file and the tier); nothing is written.
    """
    path = Path(path)
    if not rewards:
        raise InvalidInputError(f"{path}: no tier rewards to save")
    lines = []
    for line in (comment or "").splitlines():
        bad = _COMMENT_FORBIDDEN.search(line)
        if bad:
            raise InvalidInputError(
                f"{path}: the comment holds control character U+{ord(bad.group()):04X}, "
                "which a TOML comment cannot"
            )
        if _SURROGATE.search(line):
            raise InvalidInputError(f"{path}: the comment holds a lone surrogate")
        lines.append(f"# {line}")
    lines.append("[tiers]")
    for tier, value in rewards.items():
        _check_tier_name(path, tier)
        if _SURROGATE.search(tier):
            raise InvalidInputError(
                f"{path}: tier {tier!r} holds a lone surrogate, which TOML cannot represent"
            )
        lines.append(f"{_toml_key(tier)} = {_checked_reward(path, tier, value)!r}")
    text = "\n".join(lines) + "\n"
    _write_text_atomic(path, lambda fh: fh.write(text))


def _write_text_atomic(path: Path, write: Callable[[TextIO], object]) -> None:
    """A text file written by ``write(fh)`` into a temporary file beside
    ``path`` (its folder made if need be) and renamed over it: ``path`` holds
    the old contents or the whole new ones, never part of them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp_file(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_temp_file(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path``, open for writing: its descriptor
    and name. It gets the mode ``open()`` gives a new file (0o666 less the
    umask, applied by the kernel), not ``mkstemp``'s 0o600, which would
    outlive the rename; reading the umask would mean setting it, for every
    thread of the process at once."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL  # O_EXCL: a link there is not followed
    flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)  # as mkstemp's
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary file name for {path.name}")


# --------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class TieredRollouts:
    """A ragged batch with one tier code per assistant turn.

    ``turn_tiers[j]`` indexes ``tiers`` (-1: an unlabelled turn);
    ``turn_offsets`` (length B + 1) delimit each trajectory's turns; ``group``
    is a dense group id per trajectory.

    Raises:
        InvalidInputError: a column is not one-dimensional, ``group`` and
            ``outcome`` differ in length, ``turn_offsets`` does not have
            length B + 1, start at 0, rise monotonically and end at the number
            of turns, or a tier code is neither -1 nor in
            ``[0, len(tiers))``, or a tier is named twice in ``tiers`` (the
            message names the field and the first bad position, or the tier).
    """

    outcome: np.ndarray
    group: np.ndarray
    turn_offsets: np.ndarray
    turn_tiers: np.ndarray
    tiers: tuple[str, ...] = DEFAULT_TIERS

    def __post_init__(self) -> None:
        for name, dtype in (
            ("outcome", np.float64),
            ("group", np.int64),
            ("turn_offsets", np.int64),
            ("turn_tiers", np.int64),
        ):
            object.__setattr__(self, name, np.ascontiguousarray(getattr(self, name), dtype=dtype))
        object.__setattr__(self, "tiers", tuple(self.tiers))
        for name in ("outcome", "group", "turn_offsets", "turn_tiers"):
            shape = getattr(self, name).shape
            if len(shape) != 1:
                raise InvalidInputError(f"{name} must be one-dimensional, got shape {shape}")
        if len(self.group) != len(self.outcome):
            raise InvalidInputError(
                f"group has length {len(self.group)} but outcome has length {len(self.outcome)}"
            )
        _check_offsets(self.turn_offsets, len(self.outcome), len(self.turn_tiers))
        _check_tier_codes(self.turn_tiers, len(self.tiers))
        _check_unique_tiers(self.tiers)

    @property
    def num_turns(self) -> int:
        """Number of assistant turns."""
        return int(self.turn_tiers.shape[0])

    def turn_rewards(self, rewards: Mapping[str, float]) -> np.ndarray:
        """Per-turn rewards from a tier -> reward table (unknown or unlabelled: 0).

        Unlike the tables that reward turns for training, calibration's may lack
        a tier: its starting table is the rewards to compare against (a preset
        need not name a labeler's own tiers), it derives a reward for every tier
        it counts, and a tier with reward 0 is exempt from the direction check."""
        table = np.array([rewards.get(tier, 0.0) for tier in self.tiers] + [0.0])
        # Code -1 (no tier) picks the trailing 0.
        return table[self.turn_tiers]

    def with_tiers(self, tiers: Sequence[str]) -> TieredRollouts:
        """The same rollouts with codes remapped onto ``tiers`` (a superset)."""
        tiers = tuple(tiers)
        missing = [t for t in self.tiers if t not in tiers]
        if missing:
            raise InvalidInputError(f"tiers {missing} are not in the target tier list {tiers}")
        mapping = np.array([tiers.index(t) for t in self.tiers] + [-1], dtype=np.int64)
        return replace(self, turn_tiers=mapping[self.turn_tiers], tiers=tiers)


def _check_offsets(turn_offsets: np.ndarray, trajectories: int, turns: int) -> None:
    """``turn_offsets`` has length ``trajectories + 1``, starts at 0, never
    decreases and ends at ``turns``; else an error naming the first bad entry."""
    if len(turn_offsets) != trajectories + 1:
        raise InvalidInputError(
            f"turn_offsets has length {len(turn_offsets)} but must have length "
            f"len(outcome) + 1 = {trajectories + 1}"
        )
    if turn_offsets[0] != 0:
        raise InvalidInputError(f"turn_offsets[0] must be 0, got {turn_offsets[0]}")
    falls = np.flatnonzero(turn_offsets[1:] < turn_offsets[:-1])
    if len(falls):
        i = int(falls[0])
        raise InvalidInputError(
            f"turn_offsets is not monotone at trajectory {i}: turn_offsets[{i}] = "
            f"{turn_offsets[i]} > turn_offsets[{i + 1}] = {turn_offsets[i + 1]}"
        )
    if turn_offsets[-1] != turns:
        raise InvalidInputError(
            f"turn_offsets[-1] = {turn_offsets[-1]} but len(turn_tiers) = {turns}; "
            "the last offset must equal the number of turns"
        )


def _check_unique_tiers(tiers: Sequence[str]) -> None:
    """Each tier name once: rewards and correlations are looked up by name, so a
    second entry would take (or hide) the first one's figures."""
    seen: set[str] = set()
    for tier in tiers:
        if tier in seen:
            raise InvalidInputError(
                f"tiers {tuple(tiers)} name tier {tier!r} more than once; each tier once"
            )
        seen.add(tier)


def _check_tier_codes(turn_tiers: np.ndarray, tiers: int) -> None:
    """Every code is -1 (unlabelled) or in ``[0, tiers)``; else an error naming
    the first bad turn."""
    bad = np.flatnonzero((turn_tiers < -1) | (turn_tiers >= tiers))
    if len(bad):
        j = int(bad[0])
        raise InvalidInputError(
            f"turn_tiers[{j}] = {turn_tiers[j]} but a tier code must be -1 (no tier) "
            f"or in [0, {tiers}) for {tiers} tiers"
        )


# --------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class TierCorrelation:
    """One tier's relation to task success."""

    tier: str
    r: float
    p_value: float
    ci_low: float
    ci_high: float
    support: int
    success_with: float
    success_without: float


@dataclass(frozen=True, eq=False)
class TierStats:
    """Additive per-tier sums; ``a + b`` merges shards exactly. Each tier is
    named once (else :class:`~turnrl.exceptions.InvalidInputError`)."""

    tiers: tuple[str, ...]
    trajectories: int
    successes: int
    present: np.ndarray
    present_success: np.ndarray
    turns: np.ndarray
    turns_sq: np.ndarray
    turns_success: np.ndarray

    def __post_init__(self) -> None:
        _check_unique_tiers(self.tiers)

    @classmethod
    def empty(cls, tiers: Sequence[str] = DEFAULT_TIERS) -> TierStats:
        """No trajectories yet."""
        # One array per field: a shared one would alias them.
        counts = (np.zeros(len(tiers), dtype=np.int64) for _ in range(5))
        return cls(tuple(tiers), 0, 0, *counts)

    @classmethod
    def from_rollouts(cls, rollouts: TieredRollouts, success_threshold: float = 1.0) -> TierStats:
        """Sums over a batch; a trajectory succeeds when outcome >= threshold."""
        check_success_threshold(success_threshold)
        sums = _core.tier_sums(
            rollouts.outcome,
            rollouts.turn_offsets,
            rollouts.turn_tiers,
            len(rollouts.tiers),
            success_threshold,
        )
        return cls(rollouts.tiers, int(sums[0]), int(sums[1]), *sums[2:])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TierStats):
            return NotImplemented
        return (
            self.tiers == other.tiers
            and self.trajectories == other.trajectories
            and self.successes == other.successes
            and all(
                np.array_equal(getattr(self, name), getattr(other, name))
                for name in ("present", "present_success", "turns", "turns_sq", "turns_success")
            )
        )

    __hash__ = None  # type: ignore[assignment]

    def __add__(self, other: TierStats) -> TierStats:
        if other.tiers != self.tiers:
            raise InvalidInputError(
                f"cannot merge tier statistics over {other.tiers} and {self.tiers}"
            )
        return TierStats(
            self.tiers,
            self.trajectories + other.trajectories,
            self.successes + other.successes,
            self.present + other.present,
            self.present_success + other.present_success,
            self.turns + other.turns,
            self.turns_sq + other.turns_sq,
            self.turns_success + other.turns_success,
        )

    def with_tiers(self, tiers: Sequence[str]) -> TierStats:
        """The same sums over ``tiers`` (a superset of these): a tier these
        statistics never saw has zero sums, which is exact, since they add."""
        tiers = tuple(tiers)
        missing = [t for t in self.tiers if t not in tiers]
        if missing:
            raise InvalidInputError(f"tiers {missing} are not in the target tier list {tiers}")
        at = {tier: i for i, tier in enumerate(self.tiers)}
        arrays = []
        for name in _STATS_ARRAYS:
            values = getattr(self, name)
            arrays.append(
                np.array([values[at[t]] if t in at else 0 for t in tiers], dtype=np.int64)
            )
        return TierStats(tiers, self.trajectories, self.successes, *arrays)

    def correlations(
        self, variable: str = "presence", confidence: float = 0.95
    ) -> list[TierCorrelation]:
        """Point-biserial r of each tier's presence (or count) with success, its
        two-sided p-value and Fisher-z interval. A constant variable (an
        undefined r) gives r = 0, p = 1 and the interval [-1, 1] instead of
        NaN."""
        table = _core.tier_correlations(
            self.trajectories,
            self.successes,
            self.present,
            self.present_success,
            self.turns,
            self.turns_sq,
            self.turns_success,
            variable=variable,
            confidence=confidence,
        )
        result = []
        for t, tier in enumerate(self.tiers):
            with_tier = int(self.present[t])
            without = self.trajectories - with_tier
            success_with = int(self.present_success[t]) / with_tier if with_tier else math.nan
            success_without = (
                (self.successes - int(self.present_success[t])) / without if without else math.nan
            )
            r, p, low, high = (float(v) for v in table[t])
            result.append(
                TierCorrelation(tier, r, p, low, high, with_tier, success_with, success_without)
            )
        return result


def _is_finite_number(value: Any) -> bool:
    """A real number (numpy's too) that is not NaN or infinite."""
    return isinstance(value, numbers.Real) and math.isfinite(value)


def check_success_threshold(value: float) -> None:
    """:class:`~turnrl.exceptions.InvalidInputError` unless ``value`` is a finite number."""
    if not _is_finite_number(value):
        raise InvalidInputError(f"success_threshold must be a finite number, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not (_is_finite_number(value) and value > 0):
        raise InvalidInputError(f"{name} must be a finite number > 0, got {value!r}")


def rewards_from_correlations(
    correlations: Iterable[TierCorrelation],
    *,
    target: float = 1.0,
    alpha: float = 0.05,
    min_abs_r: float = 0.1,
) -> dict[str, float]:
    """A tier's reward is proportional to its r (sign kept), scaled so the
    largest magnitude is ``target``; zero when p >= alpha or |r| < min_abs_r."""
    _check_positive("target", target)
    _check_positive("alpha", alpha)
    if not (_is_finite_number(min_abs_r) and min_abs_r >= 0):
        raise InvalidInputError(f"min_abs_r must be a finite number >= 0, got {min_abs_r!r}")
    correlations = list(correlations)
    kept = {c.tier: c.r for c in correlations if c.p_value < alpha and abs(c.r) >= min_abs_r}
    largest = max((abs(r) for r in kept.values()), default=0.0)
    return {
        c.tier: (target * kept[c.tier] / largest if c.tier in kept and largest > 0 else 0.0)
        for c in correlations
    }


# --------------------------------------------------------------------------
# Direction check


@dataclass(frozen=True)
class TierDirection:
    """How the advantages of one tier's turns line up with its correlation."""

    tier: str
    reward: float
    r: float
    turns: int
    misaligned: int
    mean_advantage: float
    """The mean advantage over the tier's turns; 0 when within 1e-9 of the
    batch's largest |advantage| from 0 (the tolerance of the misaligned
    count), since rounding gives a mean that is 0 in exact arithmetic a sign
    set by the order of the turns."""

    @property
    def exempt(self) -> bool:
        """Tiers with zero reward (or no correlation) are not checked."""
        return self.reward == 0.0 or self.r == 0.0

    @property
    def aligned(self) -> bool:
        """The mean advantage over the tier's turns has the sign of r. A mean
        of 0 has no sign: the tier's reward does not credit its turns the way
        r says on average, so it is not aligned (exempt tiers and tiers
        without turns are)."""
        return self.exempt or self.turns == 0 or np.sign(self.mean_advantage) == np.sign(self.r)


def direction_check(
    rollouts: TieredRollouts,
    rewards: Mapping[str, float],
    correlations: Sequence[TierCorrelation],
    estimator: str = "gtpo_hybrid",
    **params: Any,
) -> list[TierDirection]:
    """Run the estimator with ``rewards`` and count, per tier, the turns whose
    advantage has the opposite sign of the tier's r (zero-reward tiers exempt).
    Advantages, and a tier's mean advantage, within 1e-9 of the batch's
    largest |advantage| from 0 count as 0, so the verdicts do not depend on
    the order of the input."""
    r_of = {c.tier: c.r for c in correlations}
    advantages = compute_advantages(
        estimator,
        rollouts.outcome,
        rollouts.group,
        rollouts.turn_rewards(rewards),
        rollouts.turn_offsets,
        **params,
    )
    signs = np.array(
        [
            0 if rewards.get(t, 0.0) == 0.0 else int(np.sign(r_of.get(t, 0.0)))
            for t in rollouts.tiers
        ],
        dtype=np.int8,
    )
    turns, misaligned, mean = _core.direction_check(advantages, rollouts.turn_tiers, signs)
    return [
        TierDirection(
            tier,
            rewards.get(tier, 0.0),
            r_of.get(tier, 0.0),
            int(turns[t]),
            int(misaligned[t]),
            float(mean[t]),
        )
        for t, tier in enumerate(rollouts.tiers)
    ]


# --------------------------------------------------------------------------
# The calibration loop


def _finite_or_none(row: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


@dataclass(frozen=True)
class Iteration:
    """One round of the loop: the rewards tried and what they did."""

    index: int
    rewards: dict[str, float]
    directions: list[TierDirection]

    @property
    def misaligned(self) -> int:
        """Misaligned turns over all tiers."""
        return sum(d.misaligned for d in self.directions)

    @property
    def aligned(self) -> bool:
        """Every tier with a non-zero reward is aligned."""
        return all(d.aligned for d in self.directions)


@dataclass(frozen=True)
class CalibrationReport:
    """The outcome of :func:`calibrate`: the statistics, every iteration, and
    the calibrated rewards (those of the last iteration)."""

    stats: TierStats
    correlations: list[TierCorrelation]
    initial: Iteration
    iterations: list[Iteration] = field(default_factory=list)
    estimator: str = "gtpo_hybrid"
    estimator_params: dict[str, Any] = field(default_factory=dict)
    """The estimator's parameters the direction check ran with (beyond its defaults)."""
    variable: str = "presence"
    """What of each tier the correlations are of: ``presence`` (0/1) or turn ``count``."""

    @property
    def best(self) -> Iteration:
        """The chosen iteration: among those with every tier aligned, the one
        with the fewest misaligned turns (the earliest on a tie); the last one
        when none is aligned."""
        aligned = [it for it in self.iterations if it.aligned]
        if not aligned:
            return self.iterations[-1] if self.iterations else self.initial
        return min(aligned, key=lambda it: (it.misaligned, it.index))

    @property
    def rewards(self) -> dict[str, float]:
        """The calibrated tier rewards (those of :attr:`best`)."""
        return self.best.rewards

    @property
    def converged(self) -> bool:
        """Every non-zero tier is aligned in the chosen iteration."""
        return bool(self.iterations) and self.best.aligned

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (undefined rates, NaN, become ``None``)."""

        def iteration(it: Iteration) -> dict[str, Any]:
            return {
                "index": it.index,
                "rewards": it.rewards,
                "misaligned": it.misaligned,
                "aligned": it.aligned,
                "tiers": [d.__dict__ | {"aligned": d.aligned} for d in it.directions],
            }

        return {
            "estimator": self.estimator,
            "estimator_params": dict(self.estimator_params),
            "variable": self.variable,
            "trajectories": self.stats.trajectories,
            "successes": self.stats.successes,
            "converged": self.converged,
            "chosen_iteration": self.best.index,
            "rewards": self.rewards,
            "correlations": [_finite_or_none(c.__dict__) for c in self.correlations],
            "initial": iteration(self.initial),
            "iterations": [iteration(it) for it in self.iterations],
        }


#: A tier reward within this fraction of the cap counts as at the cap in
#: :func:`calibrate` (a cap of ``2 * target`` may be written as 1.9999999999).
_AT_CAP = 1e-9


def calibrate(
    rollouts: TieredRollouts,
    initial_rewards: Mapping[str, float] | str = "naive",
    *,
    estimator: str = "gtpo_hybrid",
    target: float = 1.0,
    alpha: float = 0.05,
    min_abs_r: float = 0.1,
    max_iterations: int = 10,
    boost: float = 1.5,
    max_reward: float | None = None,
    variable: str = "presence",
    confidence: float = 0.95,
    success_threshold: float = 1.0,
    stats: TierStats | None = None,
    **estimator_params: Any,
) -> CalibrationReport:
    """Calibrate tier rewards on a batch of labelled rollouts, starting from
    ``initial_rewards`` (a table as :func:`load_tier_rewards` reads, or an
    empty mapping: every tier 0).

    1. r_pb of each tier with success (``stats`` may be given precomputed,
       e.g. merged from shards; its tiers are matched to the rollouts' by
       name, in any order, and may include more, which get rewards too;
       statistics lacking a tier of the rollouts are refused, since that
       tier's turns would silently get reward 0);
    2. rewards proportional to r_pb (:func:`rewards_from_correlations`);
    3. direction check with ``estimator``: per tier, the turns whose advantage
       has the opposite sign of r_pb;
    4. every tier with misaligned turns gets its reward's magnitude multiplied
       by ``boost`` and clamped to ``max_reward`` (default ``2 * target``),
       sign kept, so the cap itself is always tried (target 1: 1, 1.5, 2);
       a tier already at the cap (within a relative 1e-9, or above it) keeps
       its reward when its mean advantage has r_pb's sign and is set to 0
       when it does not (the wrong sign, or 0: left to the outcome term, it
       cannot be credited the right way without dominating);
    5. back to 3 until no turn is misaligned, nothing changes, or
       ``max_iterations`` rounds have run.

    A tier is aligned when its mean advantage has r_pb's sign; a mean within
    1e-9 of the batch's largest advantage from 0 is 0, which is not. A tier
    whose turns all get (about) 0, e.g. in groups of one rollout, is then
    not aligned, but has no misaligned turns: the loop leaves its reward as
    it is (nothing it could be changed to would move those turns) and the
    report says not converged.

    Every round is reported; the calibrated rewards are those of the aligned
    round with the fewest misaligned turns (:attr:`CalibrationReport.best`).
    The paper does not publish its adjustment rule; this one keeps the sign
    of r_pb, only strengthens or drops a tier, and always stops: a tier's
    magnitude rises to the cap in finitely many rounds, then stays or drops
    to 0 for good.
    """
    if max_iterations < 1:
        raise InvalidInputError(f"max_iterations must be >= 1, got {max_iterations}")
    if not (_is_finite_number(boost) and boost > 1.0):
        raise InvalidInputError(f"boost must be a finite number > 1, got {boost}")
    _check_positive("target", target)
    if max_reward is not None:
        _check_positive("max_reward", max_reward)
    cap = 2.0 * target if max_reward is None else max_reward
    start = _calibration_rewards(initial_rewards)
    if stats is None:
        stats = TierStats.from_rollouts(rollouts, success_threshold)
    else:
        # Rewards and the direction check look tiers up by name: a tier the
        # statistics lack would get r = 0, reward 0 and an exemption, unsaid.
        uncounted = [tier for tier in rollouts.tiers if tier not in stats.tiers]
        if uncounted:
            raise InvalidInputError(
                f"stats are over tiers {stats.tiers} but the rollouts' tiers are "
                f"{rollouts.tiers}: {uncounted} have no statistics; give stats of every "
                "tier of the rollouts (TierStats.with_tiers adds a tier with zero sums)"
            )
    correlations = stats.correlations(variable=variable, confidence=confidence)

    def check(index: int, rewards: dict[str, float]) -> Iteration:
        directions = direction_check(rollouts, rewards, correlations, estimator, **estimator_params)
        return Iteration(index, dict(rewards), directions)

    initial = check(0, start)
    rewards = rewards_from_correlations(
        correlations, target=target, alpha=alpha, min_abs_r=min_abs_r
    )
    iterations = [check(1, rewards)]
    while iterations[-1].misaligned > 0 and len(iterations) < max_iterations:
        rewards = dict(rewards)
        for d in iterations[-1].directions:
            if d.exempt or d.misaligned == 0:
                continue
            if abs(d.reward) < cap * (1.0 - _AT_CAP):
                # Below the cap: stronger, at most the cap (reached in finitely
                # many rounds, since boost > 1).
                rewards[d.tier] = math.copysign(min(abs(d.reward) * boost, cap), d.reward)
            elif not d.aligned:
                rewards[d.tier] = 0.0
        if rewards == iterations[-1].rewards:
            break
        iterations.append(check(len(iterations) + 1, rewards))
    return CalibrationReport(
        stats, correlations, initial, iterations, estimator, dict(estimator_params), variable
    )


STATE_FORMAT = "turnrl.online_calibrator/1"
_STATS_ARRAYS = ("present", "present_success", "turns", "turns_sq", "turns_success")


def _state_field(state: Mapping[str, Any], name: str, kind: type) -> Any:
    value = state.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidInputError(
            f"state[{name!r}] must be a {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _stats_state(stats: TierStats) -> dict[str, Any]:
    out: dict[str, Any] = {"trajectories": stats.trajectories, "successes": stats.successes}
    for name in _STATS_ARRAYS:
        out[name] = [int(v) for v in getattr(stats, name)]
    return out


def _stats_from_state(item: Any, tiers: tuple[str, ...], where: str) -> TierStats:
    if not isinstance(item, Mapping):
        raise InvalidInputError(f"{where} must be a mapping, got {type(item).__name__}")
    counts = []
    for name in ("trajectories", "successes"):
        value = item.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidInputError(f"{where}[{name!r}] must be a count, got {value!r}")
        counts.append(value)
    arrays = []
    for name in _STATS_ARRAYS:
        values = item.get(name)
        if (
            not isinstance(values, list)
            or len(values) != len(tiers)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
        ):
            raise InvalidInputError(
                f"{where}[{name!r}] must be {len(tiers)} counts (one per tier), got {values!r}"
            )
        arrays.append(np.array(values, dtype=np.int64))
    return TierStats(tiers, counts[0], counts[1], *arrays)


class OnlineCalibrator:
    """Calibration during training: rolling tier statistics over the last
    ``window`` steps, tier rewards re-derived every ``every`` steps.

    ``update`` takes each step's labelled rollouts and returns the rewards to
    use from the next step on (unchanged between re-derivations). A
    re-derivation takes the correlations from the window's statistics and
    runs the direction check on the latest step's rollouts (groups are whole
    within a step). It is held back, the rewards kept, while the window
    holds fewer than ``min_trajectories`` trajectories, or while no
    trajectory in it succeeded or every one did (``held`` counts the
    latter): no tier can then tell success from failure, and zero rewards
    would leave groups with no signal at all, early in training when nothing
    succeeds yet. A held-back re-derivation is tried again at every step
    until it happens. ``tiers`` are the tiers its statistics start with, each
    named once; a tier name first seen in a step joins them (the earlier
    steps' sums for it are zero), so leaving out built-in tiers changes
    nothing but their order. Neither ``tiers`` nor ``initial_rewards`` need
    name every tier: calibration counts a tier without a reward as 0 (exempt
    from the direction check), :func:`turnrl.train.train_loop` rewards its
    turns 0, and a re-derivation gives every tier it has counted a reward.
    With ``tiers=()`` every tier joins as it is seen; a re-derivation before
    any is seen gives the empty table (every tier 0, as the all-zero table a
    calibrator listing tiers derives then), so ``initial_rewards`` may be
    empty too. ``calibrate_kwargs`` (``estimator``, ``target``,
    ``alpha``, ...) are :func:`calibrate`'s and are checked when the
    calibrator is made.
    ``state_dict``/``load_state_dict`` (or ``save``/``load``, atomic JSON)
    checkpoint it with the rest of training, so a resumed run re-derives
    rewards at the same steps from the same window.
    """

    def __init__(
        self,
        initial_rewards: Mapping[str, float] | str = "naive",
        *,
        tiers: Sequence[str] = DEFAULT_TIERS,
        window: int = 20,
        every: int = 10,
        min_trajectories: int = 64,
        **calibrate_kwargs: Any,
    ) -> None:
        # Checked as a checkpoint of it is read back (from_state_dict): a
        # calibrator made with every=2.5 wrote checkpoints a resume refused, and
        # min_trajectories="64" failed at the first re-derivation, steps in.
        for name, value, least in (
            ("window", window, 1),
            ("every", every, 1),
            ("min_trajectories", min_trajectories, 0),
        ):
            # numpy integers are integers too (they were taken before the check).
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise InvalidInputError(f"{name} must be an integer >= {least}, got {value!r}")
        window, every, min_trajectories = int(window), int(every), int(min_trajectories)
        self.tiers = tuple(tiers)
        self.rewards = _calibration_rewards(initial_rewards)
        self.every = every
        self.min_trajectories = min_trajectories
        self.calibrate_kwargs = calibrate_kwargs
        self.steps = 0
        self.history: deque[TierStats] = deque(maxlen=window)
        self.reports: list[CalibrationReport] = []
        self.held = 0
        """Tries held back because no trajectory in the window succeeded, or every one did."""
        self.pending = False
        """A re-derivation is due and was held back: it is tried at every step."""
        reserved = {"stats", "initial_rewards", "rollouts"} & set(calibrate_kwargs)
        if reserved:
            raise InvalidInputError(f"calibrate_kwargs cannot set {sorted(reserved)}")
        # Checked now, not at the first re-derivation ``every`` steps in.
        outcome, group, turn_rewards, turn_offsets = probe_batch()
        probe = TieredRollouts(
            outcome, group, turn_offsets, np.full(turn_rewards.size, -1), self.tiers
        )
        try:
            calibrate(probe, self.rewards, **self.calibrate_kwargs)
        except (TypeError, ValueError) as e:  # InvalidInputError, UnknownNameError included
            raise InvalidInputError(f"calibrate_kwargs: {e}") from None

    @property
    def stats(self) -> TierStats:
        """The merged statistics of the window."""
        total = TierStats.empty(self.tiers)
        for step_stats in self.history:
            total = total + step_stats
        return total

    # -- checkpoints ------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to go on exactly where this calibrator is: the
        settings, the current rewards, the step count, the held-back count
        and the window's statistics, as plain JSON-compatible values (format
        ``turnrl.online_calibrator/1``). ``reports`` are not included: they
        describe past decisions, and a restored calibrator starts a new list.
        """
        return {
            "format": STATE_FORMAT,
            "tiers": list(self.tiers),
            "rewards": dict(self.rewards),
            "window": self.history.maxlen,
            "every": self.every,
            "min_trajectories": self.min_trajectories,
            "calibrate_kwargs": dict(self.calibrate_kwargs),
            "steps": self.steps,
            "held": self.held,
            "pending": self.pending,
            "history": [_stats_state(step_stats) for step_stats in self.history],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> OnlineCalibrator:
        """A calibrator restored from :meth:`state_dict`'s output.

        Raises:
            InvalidInputError: the state is not ``turnrl.online_calibrator/1``
                or a field is missing or malformed (the message names it).
        """
        if not isinstance(state, Mapping):
            raise InvalidInputError(f"state must be a mapping, got {type(state).__name__}")
        if state.get("format") != STATE_FORMAT:
            raise InvalidInputError(
                f"state['format'] must be {STATE_FORMAT!r}, got {state.get('format')!r}"
            )
        tiers = _state_field(state, "tiers", list)
        if not all(isinstance(t, str) for t in tiers):
            raise InvalidInputError("state['tiers'] must be a list of tier names")
        kwargs = _state_field(state, "calibrate_kwargs", Mapping)
        online = cls(
            dict(_state_field(state, "rewards", Mapping)),
            tiers=tiers,
            window=_state_field(state, "window", int),
            every=_state_field(state, "every", int),
            min_trajectories=_state_field(state, "min_trajectories", int),
            **kwargs,
        )
        steps = _state_field(state, "steps", int)
        if steps < 0:
            raise InvalidInputError(f"state['steps'] must be a count, got {steps}")
        history = _state_field(state, "history", list)
        if steps < len(history) or len(history) > (online.history.maxlen or 0):
            raise InvalidInputError(
                f"state['history'] holds {len(history)} steps, more than "
                f"state['steps'] ({steps}) or state['window'] ({online.history.maxlen})"
            )
        online.steps = steps
        pending = state.get("pending", False)  # states written before it was kept
        if not isinstance(pending, bool):
            raise InvalidInputError(f"state['pending'] must be a bool, got {pending!r}")
        online.pending = pending
        held = state.get("held", 0)  # states written before it was kept: 0, as they restored
        if not isinstance(held, int) or isinstance(held, bool) or not 0 <= held <= steps:
            raise InvalidInputError(
                f"state['held'] must be a count of at most state['steps'] ({steps}), got {held!r}"
            )
        online.held = held
        online.history.extend(
            _stats_from_state(item, online.tiers, f"state['history'][{i}]")
            for i, item in enumerate(history)
        )
        return online

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this calibrator's settings and state with ``state``'s."""
        self.__dict__.update(type(self).from_state_dict(state).__dict__)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state_dict` as JSON, atomically (a temporary file,
        then a rename), so a crash never leaves half a checkpoint."""
        from turnrl.irc import write_json_atomic

        write_json_atomic(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OnlineCalibrator:
        """A calibrator restored from a file written by :meth:`save`.

        Raises:
            TurnrlIOError: the file does not exist.
            InvalidInputError: it is not JSON or not a calibrator state (the
                message names the file and the field).
        """
        import json

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TurnrlIOError(f"{path}: no such calibrator state file") from None
        try:
            return cls.from_state_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise InvalidInputError(f"{path}: not JSON ({err})") from None
        except InvalidInputError as err:
            raise InvalidInputError(f"{path}: {err}") from None

    def update(self, rollouts: TieredRollouts) -> dict[str, float]:
        """Add one step; every ``every`` steps recalibrate on the window."""
        new_tiers = [t for t in rollouts.tiers if t not in self.tiers]
        if new_tiers:
            self.tiers = (*self.tiers, *new_tiers)
            self.history = deque(
                (step_stats.with_tiers(self.tiers) for step_stats in self.history),
                maxlen=self.history.maxlen,
            )
        rollouts = rollouts.with_tiers(self.tiers)
        threshold = self.calibrate_kwargs.get("success_threshold", 1.0)
        self.history.append(TierStats.from_rollouts(rollouts, threshold))
        self.steps += 1
        window_stats = self.stats
        if self.steps % self.every != 0 and not self.pending:
            return dict(self.rewards)
        self.pending = True
        if window_stats.trajectories < self.min_trajectories:
            return dict(self.rewards)
        if not 0 < window_stats.successes < window_stats.trajectories:
            self.held += 1
            return dict(self.rewards)
        # The direction check runs on this step's rollouts: groups must be
        # whole, and they are within one step.
        report = calibrate(rollouts, self.rewards, stats=window_stats, **self.calibrate_kwargs)
        self.reports.append(report)
        self.rewards = report.rewards
        self.pending = False
        return dict(self.rewards)

"""Rollout buffers: ``turnrl.rollout/1`` JSONL files, one trajectory per line.

Reading is done by the Rust core, without the GIL, plain or zstd-compressed
(recognised by the magic bytes of the first frame, a zstd frame or a skippable
frame as pzstd writes, whatever the file is called), several files in
parallel and each big file in parallel blocks. The main product is a
columnar :class:`RolloutBatch` that feeds :func:`turnrl.compute_advantages`
directly::

    batch = turnrl.read_rollouts("runs/step-*.jsonl.zst")
    adv = turnrl.compute_advantages(
        "gtpo_hybrid", batch.outcome, batch.group_index, batch.turn_rewards, batch.turn_offsets
    )

A bad line (invalid or truncated JSON, wrong schema, a missing or ill-typed
field, a non-finite number) is skipped and counted, and reported as
``"file:line: reason"``; every other line is kept. Blank lines are ignored
(they still count for line numbers), and so is a UTF-8 byte-order mark at the
very start of a file (plain, or of the decoded zstd data). Keys the columns
do not need (``meta``, ``content``, ``tool_calls``, unknown extras) are not
checked by the columnar reader; :func:`iter_rollout_records` returns them
unchanged (integers of any length included, see
:class:`RolloutRecordIterator`).

zstd data that is truncated, corrupt or followed by bytes that are not a zstd
frame is reported the way a plain file's truncated last line is: the damage is
one problem (``"file:line: zstd data truncated or damaged here (...)"``, at the
line it cut), counted in ``skipped``, and nothing after it is read.
:class:`RolloutWriter` gives every zstd frame (one per 2 MiB of records) a
content checksum, which zstd checks at the frame's end; the reader holds a
checksummed frame's lines (up to 8 MiB) until then, so a frame that fails its
check gives no line. Lines decoded from a damaged frame before the damage
showed are kept only when the frame has no checksum, holds over 8 MiB, or is
cut short by the end of the file; the problem then names them (``"lines from
N on ..."``). Only a file that cannot be opened or read raises.

Only assistant turns are turns: an assistant turn without ``reward`` has
reward 0, one without ``tier`` has tier code -1.

tau-bench's results files (a JSON list of ``{task_id, reward, info, traj,
trial}``) convert with :func:`read_taubench_results` and
:func:`write_taubench_buffer`.
"""

from __future__ import annotations

import glob
import json
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from turnrl import _core
from turnrl.exceptions import InvalidInputError, TurnrlIOError

__all__ = [
    "DEFAULT_TIERS",
    "NO_STOP_REASON",
    "NO_TIER",
    "SCHEMA",
    "RolloutBatch",
    "RolloutRecordIterator",
    "RolloutWriter",
    "buffer_stats",
    "buffer_stats_figure",
    "expand_paths",
    "iter_rollout_records",
    "plot_buffer_stats",
    "read_rollouts",
    "read_taubench_results",
    "rollout_record",
    "taubench_to_records",
    "write_taubench_buffer",
]

#: Why a buffer written over the tau-bench results it is made from is refused.
RESULTS_REPLACED = "the buffer cannot replace the results file it is made from"

SCHEMA = "turnrl.rollout/1"
"""The ``schema`` value of every record."""

DEFAULT_TIERS = ("gold", "soft", "read", "write", "error", "respond")
"""Tier names that always hold codes 0 to 5 in :attr:`RolloutBatch.tier_names`."""

NO_TIER = -1
"""Tier code of an assistant turn without a tier."""

NO_STOP_REASON = -1
"""Stop reason code of a trajectory whose ``meta`` says no ``stop_reason``."""

PathArg = str | os.PathLike[str]
Paths = PathArg | Sequence[PathArg]


def expand_paths(paths: Paths) -> list[str]:
    """File names in the given order; glob patterns expand to sorted matches.

    A file named again (twice, or by a name and a pattern, or through another
    path to it) is kept once, at its first place: read twice, its
    trajectories would count twice in every statistic.
    """
    items: Sequence[PathArg] = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    out: list[str] = []
    seen: set[Any] = set()

    def add(name: str) -> None:
        try:  # one file under two names (a hard link too): the same inode
            info = os.stat(name)
            key: Any = (info.st_dev, info.st_ino)
        except OSError:  # not there: the reader reports it
            key = os.path.realpath(name)
        if key not in seen:
            seen.add(key)
            out.append(name)

    for item in items:
        name = os.fspath(item)
        if any(c in name for c in "*?[") and not os.path.exists(name):
            matches = sorted(glob.glob(name))
            if not matches:
                raise TurnrlIOError(f"{name}: no such file: no file matches this pattern")
            for match in matches:
                add(match)
        else:
            add(name)
    if not out:
        raise InvalidInputError("no rollout files given")
    return out


def _same_path(a: PathArg, b: PathArg) -> bool:
    """Whether ``a`` and ``b`` name one file: the same path once made absolute
    and its links resolved, or (both existing) the same inode, a hard link's too."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is not there (yet)
        return False


def _check_not_input(out: PathArg, source: PathArg, what: str, option: str = "") -> None:
    """Refuse an output ``out`` (given as ``option``, e.g. ``"--out"``) that would
    replace the input ``source`` it is made from; ``what`` says which is which."""
    if _same_path(out, source):
        named = f"{option} {out}" if option else str(out)
        raise InvalidInputError(f"{named}: {what} ({source})")


@dataclass(frozen=True)
class RolloutBatch:
    """The columns of one or more rollout buffers.

    Trajectory ``i`` owns turns ``turn_offsets[i]:turn_offsets[i + 1]`` of
    ``turn_rewards`` and ``turn_tiers`` (assistant turns only). Strings are
    dictionary encoded in first-seen order: trajectory ``i``'s task is
    ``task_names[task_index[i]]``, its group ``group_names[group_index[i]]``,
    how its episode ended ``stop_reason_names[stop_reason_index[i]]`` (or
    not said when the code is :data:`NO_STOP_REASON`); turn ``j``'s tier is
    ``tier_names[turn_tiers[j]]`` or none when the code is :data:`NO_TIER`.
    ``group_index`` is what :func:`turnrl.compute_advantages` takes as
    ``group``.
    """

    outcome: np.ndarray
    """float64 [B]: task reward R[i]."""
    sample: np.ndarray
    """int64 [B]: sample index within the group."""
    group_index: np.ndarray
    """int64 [B]: dense group id."""
    group_names: list[str]
    stop_reason_index: np.ndarray
    """int64 [B]: dense id of ``meta["stop_reason"]`` (``user_stop``,
    ``transfer``, ``max_steps``, ``too_many_errors``, ``context_length`` as
    turnrl's runner writes them, or any other string), -1 when ``meta`` is
    missing or not an object or has no ``stop_reason``, or that is not a
    string. ``meta`` is never checked beyond being JSON, so a record with a
    malformed one is read all the same, with -1 here. Of a key given twice
    the last counts, as with :func:`json.loads`; a lone surrogate escape
    (``"\\ud800"``) in the name reads as U+FFFD."""
    stop_reason_names: list[str]
    """The stop reasons, in first-seen order over the files in order."""
    task_index: np.ndarray
    """int64 [B]: dense task id."""
    task_names: list[str]
    turn_offsets: np.ndarray
    """int64 [B + 1]."""
    turn_rewards: np.ndarray
    """float64 [num turns]."""
    turn_tiers: np.ndarray
    """int16 [num turns]: tier codes, -1 for none."""
    tier_names: list[str]
    file_index: np.ndarray
    """int32 [B]: index into ``files`` of each trajectory's file."""
    line: np.ndarray
    """int64 [B]: 1-based line of each trajectory in its decoded file."""
    files: list[str]
    skipped: int
    """Bad lines skipped, all of them counted."""
    problems: list[str]
    """``"file:line: reason"`` for the first 1000 skipped lines."""

    @property
    def num_trajectories(self) -> int:
        """Number of trajectories B."""
        return int(self.outcome.shape[0])

    @property
    def num_turns(self) -> int:
        """Number of assistant turns over all trajectories."""
        return int(self.turn_rewards.shape[0])

    @property
    def turn_counts(self) -> np.ndarray:
        """Assistant turns per trajectory (K_i), int64 [B]."""
        return np.diff(self.turn_offsets)

    @property
    def task_id(self) -> list[str]:
        """Task id of every trajectory (decoded from ``task_index``)."""
        names = self.task_names
        return [names[i] for i in self.task_index.tolist()]

    @property
    def group(self) -> list[str]:
        """Group of every trajectory (decoded from ``group_index``)."""
        names = self.group_names
        return [names[i] for i in self.group_index.tolist()]

    @property
    def stop_reason(self) -> list[str | None]:
        """Stop reason of every trajectory (decoded from ``stop_reason_index``),
        ``None`` where the record gives none."""
        names = self.stop_reason_names
        return [names[i] if i >= 0 else None for i in self.stop_reason_index.tolist()]

    def tier_code(self, name: str) -> int:
        """Code of tier ``name`` in ``turn_tiers``, -1 when no turn has it."""
        try:
            return self.tier_names.index(name)
        except ValueError:
            return NO_TIER

    def advantages(self, estimator: str = "gtpo_hybrid", **params: Any) -> np.ndarray:
        """:func:`turnrl.compute_advantages` on these columns, one float64 per turn."""
        from turnrl.advantages import compute_advantages

        return compute_advantages(
            estimator,
            self.outcome,
            self.group_index,
            self.turn_rewards,
            self.turn_offsets,
            **params,
        )


def buffer_stats(batch: RolloutBatch, success_threshold: float = 1.0) -> dict[str, Any]:
    """What a buffer holds, as plain JSON values (``turnrl rollouts stats``).

    Trajectories, tasks, groups and their sizes, skipped lines, the mean
    outcome and the success rate (``outcome >= success_threshold``),
    tau-bench's pass^k at k = 1, 2, 4, ... when every task has the same
    number of trajectories (else ``None``; a success as for the success
    rate), assistant turns per trajectory,
    and per tier: its turns, their share of all turns and mean reward, the
    trajectories holding it and their success rate. Turns without a tier
    are counted as ``unlabelled_turns``.

    How episodes ended, from ``meta["stop_reason"]``: ``stop_reasons`` maps
    each reason a record gives (any string, ``"(none)"`` included) to its
    trajectories, their share of all trajectories and their success rate, the
    most frequent first (ties in first-seen order); ``no_stop_reason`` has the
    same figures for the trajectories whose record gives none (None when every
    record gives one), apart, so that no reason's name can be taken for them;
    ``stop_reasons_per_file`` has the same for each file (``file``,
    ``trajectories``, ``stop_reasons``, ``no_stop_reason``), in the order read.

    ``per_file`` has, for each file in the order read, its ``file``,
    ``trajectories``, ``tasks``, ``mean_outcome``, ``success_rate``,
    ``pass_hat_k`` (of its own trajectories: None when its tasks have
    different numbers of them), ``assistant_turns``, ``unlabelled_turns`` and
    ``tiers``, as the totals have them: the figures that compare buffers (a
    base model and a trained one, two training steps).
    :func:`plot_buffer_stats` draws them.

    ``repeated_samples`` counts the trajectories with the group and sample
    of an earlier one and names the first (None when there are none): the
    same rollouts read twice (a buffer and a compressed copy of it, or a file
    holding its lines twice) count twice in every figure, and the rollouts of
    separate runs that wrote the same groups merge into them.
    """
    from turnrl.calibration import check_success_threshold

    check_success_threshold(success_threshold)
    trajectories = batch.num_trajectories
    success = batch.outcome >= success_threshold
    group_sizes = np.bincount(batch.group_index, minlength=len(batch.group_names))
    task_sizes = np.bincount(batch.task_index, minlength=len(batch.task_names))
    pass_hat = _pass_hat(batch.task_index, success)
    counts = batch.turn_counts
    (labelled,) = _tier_figures(batch, success, np.zeros(trajectories, dtype=np.int64), 1)
    return {
        "files": len(batch.files),
        "trajectories": trajectories,
        "skipped_lines": batch.skipped,
        "tasks": int((task_sizes > 0).sum()),
        "groups": int((group_sizes > 0).sum()),
        "group_size": {
            "min": int(group_sizes.min()) if trajectories else 0,
            "max": int(group_sizes.max()) if trajectories else 0,
        },
        "mean_outcome": float(batch.outcome.mean()) if trajectories else None,
        "success_rate": float(success.mean()) if trajectories else None,
        "pass_hat_k": pass_hat,
        "assistant_turns": batch.num_turns,
        "turns_per_trajectory": {
            "mean": float(counts.mean()) if trajectories else None,
            "max": int(counts.max()) if trajectories else 0,
        },
        "unlabelled_turns": labelled["unlabelled_turns"],
        "tiers": labelled["tiers"],
        "repeated_samples": _repeated_samples(
            batch.group_index,
            batch.sample,
            lambda row: batch.group_names[batch.group_index[row]],
            lambda row: f"{batch.files[batch.file_index[row]]}:{batch.line[row]}",
        ),
        **_stop_reason_rows(batch, success, slice(None)),
        "stop_reasons_per_file": [
            {
                "file": name,
                "trajectories": int(count),
                **_stop_reason_rows(batch, success, batch.file_index == k),
            }
            for k, (name, count) in enumerate(
                zip(
                    batch.files,
                    np.bincount(batch.file_index, minlength=len(batch.files)),
                    strict=True,
                )
            )
        ],
        "per_file": _per_file_figures(batch, success),
    }


def _pass_hat(task_index: np.ndarray, success: np.ndarray) -> dict[str, float] | None:
    """tau-bench's pass^k of these trajectories at k = 1, 2, 4, ... (a success
    as the success rate counts it; tau-bench's rule is outcome 1), or None
    when their tasks have different numbers of trajectories or there are none."""
    tasks, task_of, sizes = np.unique(task_index, return_inverse=True, return_counts=True)
    if not tasks.size or (sizes != sizes[0]).any():
        return None
    from turnrl.envs._base import pass_hat_ks

    # turnrl.envs.pass_hat_k's mean over tasks of C(c, k) / C(n, k), with the
    # n + 1 values it can take worked out once: millions of rows in numpy.
    n = int(sizes[0])
    wins = np.bincount(task_of, weights=success, minlength=tasks.size).astype(np.int64)
    return {
        str(k): float(
            np.array([math.comb(c, k) / math.comb(n, k) for c in range(n + 1)])[wins].mean()
        )
        for k in pass_hat_ks(n)
    }


def _per_file_figures(batch: RolloutBatch, success: np.ndarray) -> list[dict[str, Any]]:
    """:func:`buffer_stats`' ``per_file``: each file's trajectories, tasks, mean
    outcome, success rate, pass^k, assistant and unlabelled turns and tiers,
    the same figures as the totals. Worked out with one sort of the rows by
    file and counts over (file, tier) pairs, not a pass over every row per
    file: a glob can name thousands of files."""
    files = len(batch.files)
    trajectories = np.bincount(batch.file_index, minlength=files)
    outcome_sums = np.bincount(batch.file_index, weights=batch.outcome, minlength=files)
    successes = np.bincount(batch.file_index, weights=success, minlength=files)
    by_file = np.argsort(batch.file_index, kind="stable")
    starts = np.concatenate([[0], np.cumsum(trajectories)])
    labels = _tier_figures(batch, success, batch.file_index, files)
    out = []
    for k, name in enumerate(batch.files):
        rows = by_file[starts[k] : starts[k + 1]]
        count = int(trajectories[k])
        out.append(
            {
                "file": name,
                "trajectories": count,
                "tasks": int(np.unique(batch.task_index[rows]).size),
                "mean_outcome": float(outcome_sums[k] / count) if count else None,
                "success_rate": float(successes[k] / count) if count else None,
                "pass_hat_k": _pass_hat(batch.task_index[rows], success[rows]),
                **labels[k],
            }
        )
    return out


def _tier_figures(
    batch: RolloutBatch, success: np.ndarray, trajectory_key: np.ndarray, keys: int
) -> list[dict[str, Any]]:
    """For each of ``keys`` sets of trajectories (``trajectory_key[i]`` is
    trajectory i's; a file, or one set for the totals), :func:`buffer_stats`'
    ``assistant_turns``, ``unlabelled_turns`` and ``tiers``. Counts over
    (set, tier) slots, not a pass over the turns per tier or per set: a glob
    can name thousands of files."""
    # Turn j belongs to trajectory owner[j]; tier codes shift by one so that
    # "no tier" (NO_TIER, -1) has slot 0.
    owner = np.repeat(np.arange(batch.num_trajectories), batch.turn_counts)
    trajectory_key = trajectory_key.astype(np.int64)
    slots = len(batch.tier_names) + 1
    cells = keys * slots
    turn_slot = trajectory_key[owner] * slots + batch.turn_tiers.astype(np.int64) + 1
    turns = np.bincount(turn_slot, minlength=cells).reshape(keys, slots)
    reward_sums = np.bincount(turn_slot, weights=batch.turn_rewards, minlength=cells)
    reward_sums = reward_sums.reshape(keys, slots)
    # The trajectories holding each tier: one (trajectory, tier) pair each.
    tiered = batch.turn_tiers >= 0
    pairs = np.unique(owner[tiered] * slots + batch.turn_tiers[tiered].astype(np.int64) + 1)
    holder, holder_slot = pairs // slots, pairs % slots
    pair_slot = trajectory_key[holder] * slots + holder_slot
    holders = np.bincount(pair_slot, minlength=cells).reshape(keys, slots)
    holder_successes = np.bincount(pair_slot, weights=success[holder], minlength=cells)
    holder_successes = holder_successes.reshape(keys, slots)
    out = []
    for k in range(keys):
        all_turns = int(turns[k].sum())
        out.append(
            {
                "assistant_turns": all_turns,
                "unlabelled_turns": int(turns[k, 0]),
                "tiers": {
                    tier: {
                        "turns": int(turns[k, code + 1]),
                        "turn_share": int(turns[k, code + 1]) / all_turns,
                        "mean_reward": float(reward_sums[k, code + 1] / turns[k, code + 1]),
                        "trajectories": int(holders[k, code + 1]),
                        "success_rate": float(holder_successes[k, code + 1] / holders[k, code + 1]),
                    }
                    for code, tier in enumerate(batch.tier_names)
                    if turns[k, code + 1]
                },
            }
        )
    return out


def _first_repeat(group: np.ndarray, sample: np.ndarray) -> tuple[int, int, int] | None:
    """Rows with the (group, sample) pair of an earlier row: how many, the first
    of them in row order and the earlier row it repeats (the pair's first);
    None when every pair is distinct. One stable sort of the pairs, so
    millions of rows take about a second."""
    if group.shape[0] < 2:
        return None
    order = np.lexsort((sample, group))  # stable: a pair's rows in row order
    ordered_group, ordered_sample = group[order], sample[order]
    repeats = np.flatnonzero(
        (ordered_group[1:] == ordered_group[:-1]) & (ordered_sample[1:] == ordered_sample[:-1])
    )
    if not repeats.size:
        return None
    at = repeats[np.argmin(order[repeats + 1])] + 1  # where in `order` the first repeat is
    start = at - 1
    while start > 0 and (ordered_group[start - 1], ordered_sample[start - 1]) == (
        ordered_group[at],
        ordered_sample[at],
    ):
        start -= 1
    return int(repeats.size), int(order[at]), int(order[start])


def _repeated_samples(
    group: np.ndarray,
    sample: np.ndarray,
    group_name: Callable[[int], str],
    place: Callable[[int], str],
) -> dict[str, Any] | None:
    """What :func:`buffer_stats` says of trajectories whose (group, sample) an
    earlier one has (``group_name(row)`` and ``place(row)``, "file:line", name
    them), or None when there are none: ``trajectories`` (how many), and the
    first such, ``group``, ``sample``, ``at``, and ``first_at`` (the one it
    repeats)."""
    found = _first_repeat(group, sample)
    if found is None:
        return None
    count, row, earlier = found
    return {
        "trajectories": count,
        "group": group_name(row),
        "sample": int(sample[row]),
        "at": place(row),
        "first_at": place(earlier),
    }


def _stop_reason_rows(
    batch: RolloutBatch, success: np.ndarray, rows: slice | np.ndarray
) -> dict[str, Any]:
    """Trajectories, share and success rate of ``rows`` per stop reason
    (``stop_reasons``) and of those without one (``no_stop_reason``, None
    when there are none)."""
    codes = batch.stop_reason_index[rows]
    won = success[rows]
    total = int(codes.shape[0])
    if not total:
        return {"stop_reasons": {}, "no_stop_reason": None}
    # Code -1 (no reason) counts in the last slot, which no name has.
    names = batch.stop_reason_names
    none = len(names)
    slots = np.where(codes == NO_STOP_REASON, none, codes)
    counts = np.bincount(slots, minlength=none + 1)
    wins = np.bincount(slots, weights=won, minlength=none + 1)

    def row(k: int) -> dict[str, float | int]:
        return {
            "trajectories": int(counts[k]),
            "share": int(counts[k]) / total,
            "success_rate": float(wins[k] / counts[k]),
        }

    # Most frequent first, ties in first-seen order.
    order = sorted(range(none), key=lambda k: -counts[k])
    return {
        "stop_reasons": {names[k]: row(k) for k in order if counts[k]},
        "no_stop_reason": row(none) if counts[none] else None,
    }


def _stop_reason_labels(stats: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(label, figures)`` per stop reason of :func:`buffer_stats` (or of one
    file's), those without a reason last as ``(none)``. A reason that starts
    with ``(`` or ``"`` is shown JSON-quoted, so that no reason reads as
    ``(none)`` or as another reason."""
    rows = [
        (json.dumps(reason) if reason.startswith(("(", '"')) else reason, row)
        for reason, row in stats["stop_reasons"].items()
    ]
    if stats["no_stop_reason"] is not None:
        rows.append(("(none)", stats["no_stop_reason"]))
    return rows


def _short_names(files: Sequence[str], width: int = 32) -> tuple[str, list[str]]:
    """The folder the files share (``""`` when none) and each file's name
    below it, middle-elided to ``width`` characters; names that elide alike
    are numbered, so that no two files share a label."""
    parts = [name.replace(os.sep, "/").split("/") for name in files]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    folder = "/".join(parts[0][:common]) + "/" if common else ""
    names = [_elide("/".join(p[common:]), width) for p in parts]
    if len(set(names)) < len(names):
        names = [f"{k + 1}: {name}" for k, name in enumerate(names)]
    return folder, names


def _elide(text: str, width: int) -> str:
    """``text`` cut in the middle to ``width`` characters (both ends tell
    files apart: a run's name and a step number)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def buffer_stats_figure(stats: Mapping[str, Any]) -> Any:
    """A matplotlib ``Figure`` of :func:`buffer_stats`' figures (what
    ``turnrl rollouts stats --json`` prints), drawn from nothing else.

    Four panels, each found by its ``gid``: ``"pass_hat_k"``, pass^k against
    k, one line per file and one of all files given several (only ``"all"``
    given one), where it is undefined (tasks with different numbers of
    trajectories, or none) said in the legend; ``"tier_share"``, each tier's
    share of the assistant turns, and ``"tier_success"``, the success rate of
    the trajectories holding it, bars grouped per file (a file without the
    tier has no success bar, a dash); ``"stop_reasons"``, the share of
    trajectories per stop reason (``(none)`` last), per file. Files are
    labelled by their names below the folder they share, in one legend at
    the top. The caller closes the figure (``matplotlib.pyplot.close``);
    :func:`plot_buffer_stats` writes it as a PNG."""
    import textwrap

    from turnrl.irc import pyplot

    if "per_file" not in stats or "stop_reasons_per_file" not in stats:
        raise InvalidInputError(
            "stats: no per_file or stop_reasons_per_file figures; give what buffer_stats "
            "(or turnrl rollouts stats --json) returns"
        )
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import PercentFormatter

    files = [one["file"] for one in stats["per_file"]]
    folder, names = _short_names(files)
    # Bars per file given several (the comparison), else of "all", which is the file.
    if len(files) > 1:
        series = [
            (name, {**one, **stops})
            for name, one, stops in zip(
                names, stats["per_file"], stats["stop_reasons_per_file"], strict=True
            )
        ]
        lines = [*series, ("all files", stats)]
        title = f"{len(files)} rollout buffers" + (f" in {folder}" if folder else "")
        title += ": " + ", ".join(names)
    else:
        series = [("all", stats)]
        lines = series
        title = f"Rollout buffer {_elide(files[0], 100) if files else ''}"
    colors = {name: f"C{k % 10}" for k, (name, _) in enumerate(series)}
    colors["all files"] = "black"
    nan = float("nan")

    fig, axes = plt.subplot_mosaic(
        [["pass_hat_k", "stop_reasons"], ["tier_share", "tier_share"], ["tier_success"] * 2],
        figsize=(13, 12),
    )
    for gid, ax in axes.items():
        ax.set_gid(gid)

    # pass^k against k; a series without it is named in the legend, with why.
    ax = axes["pass_hat_k"]
    undefined: list[str] = []
    shown_ks: set[int] = set()
    for name, one in lines:
        values = one["pass_hat_k"]
        if values is None:
            why = "no trajectories" if not one["trajectories"] else "unequal trajectories per task"
            undefined.append(f"{name}: undefined ({why})")
            continue
        ks = [int(k) for k in values]
        shown_ks.update(ks)
        ax.plot(
            ks,
            list(values.values()),
            marker="o",
            label=name,
            color=colors[name],
            linestyle="--" if name == "all files" else "-",
        )
    if shown_ks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(shown_ks), [str(k) for k in sorted(shown_ks)])
        ax.minorticks_off()
        handles, labels = ax.get_legend_handles_labels()
        handles += [Line2D([], [], linestyle="none") for _ in undefined]
        ax.legend(handles, labels + undefined, fontsize="small", loc="upper right")
    else:
        ax.set_xticks([])
        ax.text(
            0.5,
            0.5,
            "pass^k undefined\n" + "\n".join(undefined),
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("k (trajectories of a task that must all succeed)")
    ax.set_ylabel("pass^k")
    ax.set_title("tau-bench pass^k")

    def bars(
        ax: Any, categories: list[str], values: list[list[float]], empty: str, *, whole: bool
    ) -> None:
        """Bars of ``values[s][c]`` per category, grouped by series; NaN draws
        none, with a dash unless the series has no value at all (a file with
        no trajectories, which its legend label says). On the whole 0 to 1
        scale when ``whole`` (rates), else up to the highest bar (shares of
        many tiers are small)."""
        if not categories:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            return
        x = np.arange(len(categories))
        width = 0.8 / len(series)
        for s, ((name, _), heights) in enumerate(zip(series, values, strict=True)):
            at = x - 0.4 + width * (s + 0.5)
            ax.bar(at, heights, width, label=name, color=colors[name])
            missing = np.isnan(heights)
            if not missing.all():
                for c in np.flatnonzero(missing):
                    ax.annotate("—", (at[c], 0.0), ha="center", va="bottom", color="gray")
        labels = [_elide(c, 24) for c in categories]
        crowded = len(categories) > 6 or max(len(c) for c in labels) > 10
        ax.set_xticks(x, labels, rotation=30 if crowded else 0, ha="right" if crowded else "center")
        highest = float(np.nanmax(values, initial=0.0))
        ax.set_ylim(0, 1.05 if whole or highest > 0.8 else max(highest * 1.15, 0.01))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))

    if not stats["trajectories"]:
        no_tiers = "no trajectories"
    elif not stats["assistant_turns"]:
        no_tiers = "no assistant turns"
    else:
        no_tiers = f"none of the {stats['assistant_turns']} assistant turns has a tier"
    tiers = list(stats["tiers"])
    bars(
        axes["tier_share"],
        tiers,
        # A tier a file lacks is 0 of its turns; a file without turns has no share.
        [
            [one["tiers"][t]["turn_share"] if t in one["tiers"] else 0.0 for t in tiers]
            if one["assistant_turns"]
            else [nan] * len(tiers)
            for _, one in series
        ],
        no_tiers,
        whole=False,
    )
    axes["tier_share"].set_ylabel("share of assistant turns")
    axes["tier_share"].set_title("Assistant turns per tier")
    bars(
        axes["tier_success"],
        tiers,
        [
            [one["tiers"][t]["success_rate"] if t in one["tiers"] else nan for t in tiers]
            for _, one in series
        ],
        no_tiers,
        whole=True,
    )
    axes["tier_success"].set_ylabel("success rate")
    axes["tier_success"].set_title("Success rate of the trajectories holding each tier")

    reasons = [label for label, _ in _stop_reason_labels(stats)]
    shares = []
    for _, one in series:
        rows = dict(_stop_reason_labels(one))
        # A reason a file lacks is 0 of its trajectories; a file without any has no share.
        if one["trajectories"]:
            shares.append([rows[r]["share"] if r in rows else 0.0 for r in reasons])
        else:
            shares.append([nan] * len(reasons))
    bars(axes["stop_reasons"], reasons, shares, "no trajectories", whole=True)
    axes["stop_reasons"].set_ylabel("share of trajectories")
    axes["stop_reasons"].set_title("How episodes ended (meta's stop_reason)")

    # The title, then one legend of the files' colours for every bar panel,
    # then the panels below both (placed by their drawn sizes).
    title_text = fig.suptitle("\n".join(textwrap.wrap(title, 110)), y=0.995, va="top")
    title_text.set_in_layout(False)  # its room is kept below: tight_layout would keep it again
    renderer = fig.canvas.get_renderer()
    top = title_text.get_window_extent(renderer).y0 / fig.bbox.height
    if len(series) > 1:
        legend = fig.legend(
            [Patch(color=colors[name]) for name, _ in series],
            [name if one["trajectories"] else f"{name} (no trajectories)" for name, one in series],
            loc="upper center",
            bbox_to_anchor=(0.5, top),
            ncol=min(len(series), 3),
            fontsize="small",
            frameon=False,
        )
        top = legend.get_window_extent(renderer).y0 / fig.bbox.height
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig


def plot_buffer_stats(stats: Mapping[str, Any], path: PathArg) -> None:
    """:func:`buffer_stats_figure` of ``stats`` written as a PNG at ``path``
    (whatever its suffix; its folder made if need be), beside the name and
    renamed over it: a failed save leaves the old file. What
    ``turnrl rollouts stats --plot`` writes."""
    from turnrl.irc import _save_png_atomic, pyplot

    fig = buffer_stats_figure(stats)
    try:
        _save_png_atomic(fig, path)
    finally:
        pyplot().close(fig)


def read_rollouts(
    paths: Paths,
    *,
    workers: int | None = None,
    on_progress: Callable[[int], object] | None = None,
) -> RolloutBatch:
    """Read rollout buffers into columns.

    Args:
        paths: one file or a sequence of files, plain JSONL or zstd; glob
            patterns (``"runs/*.jsonl.zst"``) expand to their sorted matches.
            Trajectories keep the order of the files and of their lines.
        workers: threads to use; ``None`` uses every core, ``1`` reads on
            the calling thread's single worker.
        on_progress: called with the number of input bytes (compressed bytes
            for zstd files) read since its last call, about ten times a
            second from a watcher thread and once at the end, so
            ``tqdm(...).update`` can be passed as is. The calls add up to
            the total size of the files.

    Returns:
        A :class:`RolloutBatch`. Bad lines are skipped, counted in
        ``skipped`` and described in ``problems``.

    Raises:
        TurnrlIOError: a file is missing or unreadable; the message names
            the path. (Damaged zstd data is a problem, not an error: see the
            module's notes.)
        InvalidInputError: the files hold more than 32,768 distinct tier
            names (the 6 default tiers included): tier codes are int16. The
            message names the first name past the limit and its file and
            line. (Two tiers never share a code, and no line is dropped for
            it.)
    """
    if workers is not None and workers < 1:
        raise InvalidInputError(f"workers must be at least 1, got {workers}")
    files = expand_paths(paths)
    if on_progress is None:
        return RolloutBatch(**_core.read_rollouts(files, workers=workers))
    progress = _core.ReadProgress()
    finished = threading.Event()
    reported = 0

    def report() -> None:
        nonlocal reported
        now = progress.bytes
        if now > reported:
            on_progress(now - reported)
            reported = now

    def watch() -> None:
        # The reader runs without the GIL, so this thread can report.
        while not finished.wait(0.1):
            report()

    watcher = threading.Thread(target=watch, name="turnrl-read-progress", daemon=True)
    watcher.start()
    try:
        columns = _core.read_rollouts(files, workers=workers, progress=progress)
    finally:
        finished.set()
        watcher.join()
    report()
    return RolloutBatch(**columns)


# Digits that ``int()`` always converts: Python's limit on decimal string
# conversion (``sys.set_int_max_str_digits``) cannot be set below 640.
_SAFE_INT_DIGITS = 640


def _exact_int(text: str) -> int:
    """The integer written in ``text`` (JSON syntax), however many digits it has.

    ``int()`` refuses more than ``sys.get_int_max_str_digits()`` digits (4300
    by default); this converts pieces it accepts and joins them exactly, by
    halves so that long numbers cost about as much as the multiplications.
    """
    if text.startswith("-"):
        return -_exact_int(text[1:])
    if len(text) <= _SAFE_INT_DIGITS:
        return int(text)
    low_digits = len(text) // 2
    high, low = text[:-low_digits], text[-low_digits:]
    return _exact_int(high) * 10**low_digits + _exact_int(low)


def _decode_record(text: str) -> dict[str, Any]:
    """Decode a line that the Rust reader has checked.

    The Rust reader accepts integers of any length where it does not read
    the value (``meta``, ``content``, tool arguments, extras), so
    ``json.loads`` alone would raise ``ValueError`` on an integer longer than
    Python's string conversion limit. Such a line is decoded again with
    integers converted exactly, and kept: the records match the lines
    :func:`read_rollouts` keeps.
    """
    try:
        record: dict[str, Any] = json.loads(text)
    except ValueError:
        # Only the integer limit makes a checked line fail here; the common
        # path keeps json's own (faster) integer parsing.
        record = json.loads(text, parse_int=_exact_int)
    return record


class RolloutRecordIterator(Iterator[dict[str, Any]]):
    """Full records (dicts) of rollout buffers, in file and line order.

    The same lines are kept and skipped as by :func:`read_rollouts`;
    ``skipped`` and ``problems`` grow as reading goes on. Integers longer
    than Python's string conversion limit (4300 digits by default, see
    ``sys.set_int_max_str_digits``) are read exactly; note that
    ``json.dumps``, and so :class:`RolloutWriter`, cannot write them back
    while that limit is in force.
    """

    def __init__(self, paths: Paths, *, with_source: bool = False) -> None:
        self._reader = _core.RolloutLineReader(expand_paths(paths))
        self._with_source = with_source
        self._pending: list[tuple[int, int, str]] = []
        self._pos = 0

    def __iter__(self) -> RolloutRecordIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._pos == len(self._pending):
            self._pending = self._reader.next_lines()
            self._pos = 0
            if not self._pending:
                raise StopIteration
        file, line, text = self._pending[self._pos]
        self._pos += 1
        record = _decode_record(text)
        if self._with_source:
            record["_source"] = {"file": self._reader.files[file], "line": line}
        return record

    @property
    def skipped(self) -> int:
        """Bad lines skipped so far."""
        return self._reader.skipped

    @property
    def problems(self) -> list[str]:
        """``"file:line: reason"`` of the bad lines seen so far (first 1000)."""
        return self._reader.problems


def iter_rollout_records(paths: Paths, *, with_source: bool = False) -> RolloutRecordIterator:
    """Iterate over the full records of rollout buffers as dicts.

    With ``with_source=True`` each dict gains ``"_source": {"file", "line"}``.
    The returned iterator exposes ``skipped`` and ``problems``.
    """
    return RolloutRecordIterator(paths, with_source=with_source)


def rollout_record(
    task_id: str,
    group: str,
    sample: int,
    outcome: float,
    turns: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a ``turnrl.rollout/1`` record (a dict ready for :class:`RolloutWriter`)."""
    return {
        "schema": SCHEMA,
        "task_id": task_id,
        "group": group,
        "sample": sample,
        "outcome": outcome,
        "turns": [dict(t) for t in turns],
        "meta": dict(meta or {}),
    }


Compress = Literal["auto", "zstd"] | None


class RolloutWriter:
    """Write a rollout buffer atomically.

    Records go to a temporary file of this writer's own next to ``path``
    (``.NAME.tmp-PID-N``), which replaces ``path`` on :meth:`close`; used as
    a context manager, an exception inside the block aborts instead, leaving
    ``path`` as it was. Several writers may write to the same ``path``: the
    last to close leaves its records, and one dropped unclosed removes only
    its own temporary file. The temporary file is the creating process's:
    in a forked child, :meth:`write` and :meth:`close` raise
    :class:`~turnrl.exceptions.InvalidInputError`, and :meth:`abort` (or
    the child dropping its copy) leaves the file to the parent. Every record
    is checked against ``turnrl.rollout/1`` (the reader's own rules) before
    it is written; a bad
    one raises :class:`~turnrl.exceptions.InvalidInputError` and is not
    written. So does a string holding a lone surrogate (``"\\ud800"``): it
    is not Unicode text and has no UTF-8 form, although ``json.loads`` (and
    so :func:`iter_rollout_records`) produces one from the escape.

    Args:
        path: the target file.
        compress: ``"zstd"``, ``None`` (plain), or ``"auto"`` (zstd when the
            name ends in ``.zst`` or ``.zstd``, plain otherwise).
        level: zstd level, within zstd's range (``-131072`` to ``22`` with
            zstd 1.5; 3 is zstd's default, 0 stands for it, negative levels
            are faster). Any other raises
            :class:`~turnrl.exceptions.InvalidInputError` naming the level and
            the range (also for a plain file, which does not use it).
    """

    def __init__(self, path: PathArg, compress: Compress = "auto", *, level: int = 3) -> None:
        name = os.fspath(path)
        if compress == "auto":
            compress = "zstd" if name.endswith((".zst", ".zstd")) else None
        if compress not in (None, "zstd"):
            raise InvalidInputError(f"compress must be None, 'zstd' or 'auto', got {compress!r}")
        if isinstance(level, bool) or not isinstance(level, int):
            raise InvalidInputError(f"level must be an integer, got {level!r}")
        self.path = name
        self._writer = _core.RolloutFileWriter(name, compress or "none", level)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (a mapping in the ``turnrl.rollout/1`` layout)."""
        text = self._encode(record)
        try:
            self._writer.write_line(text)
        except UnicodeEncodeError as e:
            # Only a lone surrogate in one of the record's strings gets here.
            where = _surrogate_path(record, "") or f"character {e.start} of its JSON text"
            bad = text[e.start : e.end]
            raise InvalidInputError(
                f"record {self._writer.written}: {where}: holds a lone surrogate {bad!r} "
                "(not valid Unicode; it cannot be written as UTF-8)"
            ) from None

    def write_many(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Append records in order; returns how many were written."""
        count = 0
        for record in records:
            self.write(record)
            count += 1
        return count

    def _encode(self, record: Mapping[str, Any]) -> str:
        index = self._writer.written
        if not isinstance(record, Mapping):
            raise InvalidInputError(f"record {index}: expected a mapping, got {type(record)!r}")
        try:
            return json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"record {index}: cannot be written as JSON: {e}") from None

    @property
    def written(self) -> int:
        """Records written so far."""
        return self._writer.written

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` or :meth:`abort` has run."""
        return not self._writer.is_open

    def close(self) -> None:
        """Flush, sync and move the file into place (idempotent).

        The folder is synced after the rename (on unix), so a crash right
        after ``close`` does not lose the new file.
        """
        self._writer.finish()

    def abort(self) -> None:
        """Drop everything written; ``path`` is left untouched."""
        self._writer.abort()

    def __enter__(self) -> RolloutWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _has_surrogate(text: str) -> bool:
    """Whether ``text`` holds a code point of the surrogate range."""
    return any("\ud800" <= c <= "\udfff" for c in text)


def _surrogate_path(value: object, path: str) -> str | None:
    """Where in ``value`` the first string with a lone surrogate sits.

    A path such as ``meta.note`` or ``turns[0].content`` (``<record>`` for
    the record itself), ending in ``key ...`` when the string is a key;
    ``None`` when there is none.
    """
    if isinstance(value, str):
        return (path or "<record>") if _has_surrogate(value) else None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and _has_surrogate(key):
                return f"{path or '<record>'}: key {key!r}"
            found = _surrogate_path(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _surrogate_path(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------------------
# tau-bench results


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {text}")
    return value


def _writable(value: Any) -> bool:
    """Whether ``value`` can go into a rollout record: no NaN or infinity, no
    lone surrogate (the rules :class:`RolloutWriter` applies)."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _taubench_arguments(arguments: Any) -> Any:
    """A call's arguments: JSON text decoded strictly (no NaN, Infinity,
    out-of-range floats or lone surrogates); text that is not such JSON stays
    the raw string, and an object that a record cannot hold becomes its JSON
    text, so one odd call never stops a conversion."""
    if isinstance(arguments, str):
        try:
            decoded = json.loads(
                arguments, parse_constant=_reject_constant, parse_float=_finite_float
            )
        except (ValueError, RecursionError):
            return arguments  # kept as the raw string: a malformed call is data too
        return decoded if _writable(decoded) else arguments
    if _writable(arguments):
        return arguments
    try:
        return json.dumps(arguments)
    except (TypeError, ValueError, RecursionError):
        return repr(arguments)


def _taubench_turn(message: Mapping[str, Any], where: str) -> dict[str, Any]:
    role = message.get("role")
    if not isinstance(role, str):
        raise InvalidInputError(f"{where}: message without a string 'role'")
    content = message.get("content")
    turn: dict[str, Any] = {"role": role, "content": "" if content is None else content}
    if role == "assistant":
        tool_calls = message.get("tool_calls") or []
        if not isinstance(tool_calls, list):
            raise InvalidInputError(
                f"{where}: 'tool_calls' must be a list, got {type(tool_calls).__name__}"
            )
        calls = []
        for j, call in enumerate(tool_calls):
            if not isinstance(call, Mapping):
                raise InvalidInputError(
                    f"{where}: tool_calls[{j}]: expected an object, got {type(call).__name__}"
                )
            function = call.get("function") or {}
            if not isinstance(function, Mapping):
                raise InvalidInputError(
                    f"{where}: tool_calls[{j}]: 'function' must be an object, "
                    f"got {type(function).__name__}"
                )
            calls.append(
                {
                    "id": call.get("id"),
                    "name": function.get("name"),
                    "arguments": _taubench_arguments(function.get("arguments")),
                }
            )
        if calls:
            turn["tool_calls"] = calls
        tier = message.get("tier")
        reward = message.get("reward")
        turn["tier"] = tier if isinstance(tier, str) else None
        if isinstance(reward, (int, float)) and not isinstance(reward, bool):
            if not _holdable_reward(reward):
                raise InvalidInputError(
                    f"{where}: 'reward' {_short_number(reward)} is not a finite number "
                    "of at most 1e100 in size"
                )
            turn["reward"] = float(reward)
        else:
            turn["reward"] = 0.0
    elif role == "tool":
        turn["name"] = message.get("name")
        turn["tool_call_id"] = message.get("tool_call_id")
    return turn


_I64 = range(-(2**63), 2**63)


def _holdable_reward(value: int | float) -> bool:
    """Whether a reward fits a buffer: finite and at most 1e100 in size (the
    estimators' sums of squares overflow past it). The size is compared first:
    an integer too big for a float (JSON has no limit) makes ``math.isfinite``
    raise OverflowError, while the comparison is exact."""
    return abs(value) <= 1e100 and math.isfinite(value)


def _short_number(value: int | float) -> str:
    """``value`` for a message, a huge integer cut to its first digits."""
    if isinstance(value, int) and value.bit_length() > 4000:
        # Python refuses to write an integer of more than 4300 digits.
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def taubench_to_records(
    results: Sequence[Mapping[str, Any]],
    env: str | None = None,
    split: str | None = None,
    *,
    keep_system: bool = False,
    source: str = "tau-bench results",
) -> list[dict[str, Any]]:
    """Convert tau-bench ``EnvRunResult`` entries into ``turnrl.rollout/1`` records.

    - ``task_id``: ``"{env}/{split}/{task_id}"`` (the prefixes that are given);
      ``group`` is the same string, since tau-bench reruns a task in trials;
    - ``sample``: the entry's ``trial`` (or ``info["trial"]``); an entry
      without one, or whose trial an earlier entry of the same task already
      has, gets the smallest number no entry of its task uses, in order of
      appearance, so the trajectories of a task have distinct samples;
    - ``outcome``: the entry's ``reward``;
    - ``turns``: the messages of ``traj`` without the system prompt (it is
      the same policy text in every entry; ``keep_system=True`` keeps it in
      ``meta["system_prompt"]``). Assistant turns get ``tool_calls`` as
      ``{"id", "name", "arguments"}`` with the arguments decoded from their
      JSON string (kept as the string when it is not strict JSON: NaN,
      Infinity, a float out of range or a lone surrogate keep it raw), and
      ``tier``/``reward`` from the message when present (a ``tier`` that
      is not a string counts as absent, so does a ``reward`` that is not a
      number), else ``None``/0;
    - ``meta``: ``{"source": "tau-bench", "task_index", "trial", "info"}``;
      ``info`` holds tau-bench's task (with its gold actions) and reward info.

    Raises:
        InvalidInputError: an entry that is not tau-bench's format: not an
            object, a ``task_id`` that is not an integer or a non-empty
            string, a ``reward`` that is not a finite number of at most 1e100
            in size (an integer too big for a float included; so for a
            message's numeric ``reward``), ``info`` or ``traj`` of the wrong
            type, a message that is not an object or
            has no string ``role``, ``tool_calls`` that is not a list of
            objects or a ``function`` that is not an object. The message
            names the entry, its task id, the message and the call.
    """
    prefix = "/".join(p for p in (env, split) if p)
    converted: list[tuple[str, int | None, float, list[dict[str, Any]], dict[str, Any]]] = []
    for index, entry in enumerate(results):
        where = f"{source}: entry {index}"
        if not isinstance(entry, Mapping):
            raise InvalidInputError(f"{where}: expected an object, got {type(entry).__name__}")
        if "task_id" not in entry:
            raise InvalidInputError(f"{where}: missing 'task_id'")
        task_ref = entry["task_id"]
        if isinstance(task_ref, bool) or not isinstance(task_ref, (int, str)) or task_ref == "":
            raise InvalidInputError(
                f"{where}: 'task_id' must be an integer or a non-empty string, got {task_ref!r}"
            )
        reward = entry.get("reward")
        if isinstance(reward, bool) or not isinstance(reward, (int, float)):
            raise InvalidInputError(f"{where}: 'reward' must be a number, got {reward!r}")
        if not _holdable_reward(reward):
            raise InvalidInputError(
                f"{where} (task {task_ref!r}): 'reward' {_short_number(reward)} is not a "
                "finite number of at most 1e100 in size"
            )
        info = entry.get("info") or {}
        if not isinstance(info, Mapping):
            raise InvalidInputError(f"{where}: 'info' must be an object")
        traj = entry.get("traj") or []
        if not isinstance(traj, list):
            raise InvalidInputError(f"{where}: 'traj' must be a list")
        task = str(task_ref)
        task_id = f"{prefix}/{task}" if prefix else task
        trial = entry.get("trial", info.get("trial"))
        if isinstance(trial, bool) or not isinstance(trial, int) or trial not in _I64:
            trial = None
        meta: dict[str, Any] = {
            "source": "tau-bench",
            "task_index": task_ref,
            "trial": trial,
            "info": dict(info),
        }
        turns = []
        for k, message in enumerate(traj):
            at = f"{where} (task_id {task_ref!r}): traj[{k}]"
            if not isinstance(message, Mapping):
                raise InvalidInputError(f"{at} is not an object")
            if message.get("role") == "system":
                if keep_system:
                    meta["system_prompt"] = message.get("content")
                continue
            turns.append(_taubench_turn(message, at))
        converted.append((task_id, trial, float(reward), turns, meta))
    # Samples: an entry's own trial when no earlier entry of its task has it,
    # else the smallest number none of the task's entries uses.
    given: dict[str, set[int]] = {}
    for task_id, trial, *_ in converted:
        if trial is not None:
            given.setdefault(task_id, set()).add(trial)
    used: dict[str, set[int]] = {}
    next_free: dict[str, int] = {}
    records = []
    for task_id, trial, reward, turns, meta in converted:
        taken = used.setdefault(task_id, set())
        if trial is not None and trial not in taken:
            sample = trial
        else:
            sample = next_free.get(task_id, 0)
            reserved = given.get(task_id, set())
            while sample in taken or sample in reserved:
                sample += 1
            next_free[task_id] = sample + 1
        taken.add(sample)
        records.append(rollout_record(task_id, task_id, sample, reward, turns, meta))
    return records


def read_taubench_results(
    path: PathArg,
    env: str | None = None,
    split: str | None = None,
    *,
    keep_system: bool = False,
) -> list[dict[str, Any]]:
    """Read a tau-bench results file (``results/*.json``) as rollout records.

    See :func:`taubench_to_records` for the mapping. Raises
    :class:`~turnrl.exceptions.TurnrlIOError` when the file cannot be read
    and :class:`~turnrl.exceptions.InvalidInputError` naming the entry when
    it is not in tau-bench's format.
    """
    name = os.fspath(path)
    try:
        # utf-8-sig: a byte-order mark (some editors write one) is skipped,
        # as the rollout readers skip it.
        with open(name, encoding="utf-8-sig") as f:
            data = json.load(f)
    except OSError as e:
        raise TurnrlIOError(f"{name}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{name}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise InvalidInputError(f"{name}: JSON nested too deeply to read") from None
    except ValueError as e:
        # An integer of more digits than Python converts (4300 by default).
        raise InvalidInputError(f"{name}: invalid JSON: {e}") from None
    if not isinstance(data, list):
        raise InvalidInputError(
            f"{name}: expected a JSON list of results, got {type(data).__name__}"
        )
    return taubench_to_records(data, env, split, keep_system=keep_system, source=name)


def write_taubench_buffer(
    results_path: PathArg,
    out_path: PathArg,
    env: str | None = None,
    split: str | None = None,
    *,
    compress: Compress = "auto",
    keep_system: bool = False,
) -> int:
    """Convert a tau-bench results file into a rollout buffer; returns the record
    count. An ``out_path`` that is ``results_path`` (by any path to it) is refused."""
    _check_not_input(out_path, results_path, RESULTS_REPLACED)
    records = read_taubench_results(results_path, env, split, keep_system=keep_system)
    with RolloutWriter(out_path, compress) as writer:
        return writer.write_many(records)

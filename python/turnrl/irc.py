"""Offline IRC over rollout buffers: shards read in parallel (threads in the
Rust reader, or Ray tasks across a cluster), statistics merged exactly,
calibration on the merged columns, and the report as JSON and a plot.

Used by ``turnrl calibrate``; callable from Python the same way.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from turnrl.calibration import (
    DEFAULT_TIERS,
    CalibrationReport,
    TieredRollouts,
    TierStats,
    _new_temp_file,
    _write_text_atomic,
    check_success_threshold,
)
from turnrl.exceptions import InvalidInputError

__all__ = [
    "Shard",
    "load_buffers",
    "plot_report",
    "read_shard",
    "repeated_samples",
    "tiered_from_batch",
    "tiered_from_records",
    "write_json_atomic",
]


def tiered_from_batch(batch: Any) -> TieredRollouts:
    """The tier columns of a :class:`turnrl.RolloutBatch`."""
    return TieredRollouts(
        batch.outcome,
        batch.group_index,
        batch.turn_offsets,
        batch.turn_tiers.astype(np.int64),
        tuple(batch.tier_names),
    )


def _group_name(record: Mapping[str, Any]) -> str:
    """A record's group: a record without one (or with group None) is its task's
    group; any other name, "" included, is a group, as the buffer reader reads it."""
    name = record.get("group")
    return str(record.get("task_id") if name is None else name)


def tiered_from_records(
    records: Sequence[Mapping[str, Any]], tiers: Sequence[str] = DEFAULT_TIERS
) -> TieredRollouts:
    """The tier columns of ``turnrl.rollout/1`` records held in memory.

    As the buffer reader reads them: one trajectory per record, groups in
    first-seen order (the group ``""`` too; a record without a group, which
    the reader refuses, is its task's group), each assistant turn's ``tier``
    as a code into ``tiers`` (None: unlabelled). A tier name not in
    ``tiers`` is appended, in the order first met.

    Raises:
        InvalidInputError: a record has no usable outcome or turns, or a tier
            that is not a string (the message names the record).
    """
    names = list(tiers)
    code_of = {name: code for code, name in enumerate(names)}
    group_of: dict[str, int] = {}
    outcome = np.empty(len(records), dtype=np.float64)
    group = np.empty(len(records), dtype=np.int64)
    offsets = [0]
    codes: list[int] = []
    for i, record in enumerate(records):
        where = f"record {i} (task {record.get('task_id')!r}, sample {record.get('sample')!r})"
        try:
            value = record["outcome"]
            turns = list(record["turns"])
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInputError(f"{where}: no usable outcome or turns ({e!r})") from None
        # As the buffer reader: a number (not a bool or a numeric string) of at
        # most 1e100 in size, the estimators' limit (compared as it is: an int
        # too large for a float is beyond it, not an OverflowError).
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not abs(value) <= 1e100
        ):
            raise InvalidInputError(
                f"{where}: outcome must be a number of at most 1e100 in size, got {value!r}"
            )
        outcome[i] = float(value)
        group[i] = group_of.setdefault(_group_name(record), len(group_of))
        for turn in turns:
            if not isinstance(turn, Mapping) or turn.get("role") != "assistant":
                continue
            tier = turn.get("tier")
            if tier is None:
                codes.append(-1)
                continue
            if not isinstance(tier, str):
                raise InvalidInputError(f"{where}: a tier must be a string, got {tier!r}")
            if tier not in code_of:
                code_of[tier] = len(names)
                names.append(tier)
            codes.append(code_of[tier])
        offsets.append(len(codes))
    return TieredRollouts(
        outcome,
        group,
        np.asarray(offsets, dtype=np.int64),
        np.asarray(codes, dtype=np.int64),
        tuple(names),
    )


@dataclass
class Shard:
    """What one worker returns for its files: the compact columns, their
    group names (so groups spanning shards merge), and the bad lines it
    skipped."""

    rollouts: TieredRollouts
    group_names: list[str]
    files: list[str]
    bytes_read: int
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    sample: np.ndarray | None = None
    """int64 [B]: each trajectory's sample (None: not known)."""
    file_index: np.ndarray | None = None
    """int32 [B]: each trajectory's file, an index into ``files``."""
    line: np.ndarray | None = None
    """int64 [B]: each trajectory's line in its file."""


def read_shard(
    paths: Sequence[str],
    workers: int | None = 1,
    on_progress: Callable[[int], object] | None = None,
) -> Shard:
    """Read some buffer files into a :class:`Shard` (runs in a worker)."""
    from turnrl.rollouts import read_rollouts

    batch = read_rollouts(list(paths), workers=workers, on_progress=on_progress)
    rollouts = tiered_from_batch(batch)
    return Shard(
        rollouts=rollouts,
        group_names=list(batch.group_names),
        files=list(paths),
        bytes_read=sum(os.path.getsize(p) for p in paths),
        skipped=batch.skipped,
        problems=list(batch.problems),
        sample=batch.sample,
        file_index=batch.file_index,
        line=batch.line,
    )


def _merge(shards: Sequence[Shard], tiers: Sequence[str]) -> TieredRollouts:
    """Concatenate shard columns onto one tier list and one group numbering."""
    group_ids: dict[str, int] = {}
    outcome, group, tier_codes, counts = [], [], [], []
    for shard in shards:
        remapped = shard.rollouts.with_tiers(tiers)
        ids = np.array(
            [group_ids.setdefault(name, len(group_ids)) for name in shard.group_names],
            dtype=np.int64,
        )
        outcome.append(remapped.outcome)
        group.append(ids[remapped.group] if len(ids) else remapped.group)
        tier_codes.append(remapped.turn_tiers)
        counts.append(np.diff(remapped.turn_offsets))
    all_counts = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(all_counts)]).astype(np.int64)
    merged = TieredRollouts(
        np.concatenate(outcome) if outcome else np.zeros(0),
        np.concatenate(group) if group else np.zeros(0, dtype=np.int64),
        offsets,
        np.concatenate(tier_codes) if tier_codes else np.zeros(0, dtype=np.int64),
        tuple(tiers),
    )
    return merged


def repeated_samples(shards: Sequence[Shard], merged: TieredRollouts) -> dict[str, Any] | None:
    """The trajectories of ``shards`` (merged by :func:`load_buffers` into
    ``merged``) with the group and sample of an earlier one, as
    :func:`turnrl.rollouts.buffer_stats` gives them in ``repeated_samples``:
    how many, and the first with its place and the place of the one it
    repeats; None when there are none, or when a shard lacks its samples."""
    from turnrl.rollouts import _repeated_samples

    if not shards or any(
        s.sample is None or s.file_index is None or s.line is None for s in shards
    ):
        return None
    starts = np.cumsum([0] + [len(s.rollouts.outcome) for s in shards])

    def shard_row(row: int) -> tuple[Shard, int]:
        k = int(np.searchsorted(starts, row, side="right")) - 1
        return shards[k], row - int(starts[k])

    def group_name(row: int) -> str:
        shard, at = shard_row(row)
        return shard.group_names[int(shard.rollouts.group[at])]

    def place(row: int) -> str:
        shard, at = shard_row(row)
        assert shard.file_index is not None and shard.line is not None
        return f"{shard.files[int(shard.file_index[at])]}:{int(shard.line[at])}"

    sample = np.concatenate([s.sample for s in shards if s.sample is not None])
    return _repeated_samples(merged.group, sample, group_name, place)


def load_buffers(
    paths: Sequence[str],
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    success_threshold: float = 1.0,
    progress: Callable[[int], None] | None = None,
) -> tuple[TieredRollouts, TierStats, list[Shard]]:
    """Read every buffer file and merge the shards.

    Locally each file is a shard (one per file, in input order). Up to
    ``workers`` files are read at once, each by the Rust reader on its own
    thread (it releases the GIL), so single-threaded zstd decompression of
    several files overlaps; the ``workers`` threads are shared out among the
    files in flight (with ``workers=None`` they share every core through the
    reader's common thread pool). ``progress`` gets input bytes as they are
    read, one call at a time. With ``ray_address`` each file is a Ray task on
    the cluster (``"local"`` starts a local instance) and ``progress`` gets
    the bytes of each finished shard.

    Raises:
        InvalidInputError: no paths, or ``workers`` below 1.
        TurnrlIOError: a file is missing or unreadable; when several are,
            the first in input order is reported.
    """
    if not paths:
        raise InvalidInputError("no input files")
    if workers is not None and workers < 1:
        raise InvalidInputError(f"workers must be at least 1, got {workers}")
    check_success_threshold(success_threshold)  # before the reading, not after it
    if ray_address is not None:
        shards = _map_with_ray(paths, ray_address, progress)
    else:
        shards = _read_concurrently(paths, workers, progress)
    tiers = list(DEFAULT_TIERS)
    for shard in shards:
        tiers.extend(t for t in shard.rollouts.tiers if t not in tiers)
    merged = _merge(shards, tiers)
    # The columns come back whole anyway, so the (integer, exact) tier sums
    # are taken once over them rather than per shard and added.
    return merged, TierStats.from_rollouts(merged, success_threshold), shards


def _available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _one_call_at_a_time(callback: Callable[[int], None]) -> Callable[[int], None]:
    """``callback`` behind a lock, for calls from several threads."""
    lock = threading.Lock()

    def locked(value: int) -> None:
        with lock:
            callback(value)

    return locked


def _read_concurrently(
    paths: Sequence[str],
    workers: int | None,
    progress: Callable[[int], None] | None,
) -> list[Shard]:
    """One :func:`read_shard` per file, up to the worker budget at once.

    With ``workers = n`` at most ``n`` files are in flight and each reads
    with ``n // in_flight`` threads (at least 1), so the reader never runs
    more than about ``n`` threads. With ``workers = None`` as many files as
    there are cores are in flight and every read uses the reader's shared
    pool of one thread per core. Shards come back in input order; the first
    failing file in input order raises, and reads not yet started are
    cancelled.
    """
    budget = workers if workers is not None else _available_cores()
    in_flight = min(len(paths), budget)
    per_file = None if workers is None else max(1, workers // in_flight)
    report = progress
    if progress is not None and in_flight > 1:
        # Each read reports from its own watcher thread: one call at a time.
        report = _one_call_at_a_time(progress)
    if in_flight == 1:
        return [read_shard([path], per_file, on_progress=report) for path in paths]
    executor = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="turnrl-read")
    try:
        futures = [
            executor.submit(read_shard, [path], per_file, on_progress=report) for path in paths
        ]
        return [future.result() for future in futures]
    finally:
        # On an error (or an interrupt) the reads not yet started are dropped;
        # those running finish, since the Rust reader cannot be stopped.
        executor.shutdown(wait=True, cancel_futures=True)


def _map_with_ray(
    paths: Sequence[str],
    address: str,
    progress: Callable[[int], None] | None,
) -> list[Shard]:
    try:
        import ray
    except ImportError:
        raise InvalidInputError("--ray needs the ray package: pip install 'ray[default]'") from None
    if not ray.is_initialized():
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    remote_read = ray.remote(read_shard)
    # Ray schedules the shards; each task reads its file with one thread.
    pending = {remote_read.remote([p], 1): i for i, p in enumerate(paths)}
    shards: list[Shard | None] = [None] * len(paths)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            shard = ray.get(ref)
            shards[pending.pop(ref)] = shard
            if progress is not None:
                progress(shard.bytes_read)
    return [s for s in shards if s is not None]


def write_json_atomic(data: Any, path: str | os.PathLike[str]) -> None:
    """Write JSON through a temporary file and a rename."""

    def write(fh: TextIO) -> None:
        json.dump(data, fh, indent=2, allow_nan=False, default=_json_default)
        fh.write("\n")

    _write_text_atomic(Path(path), write)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or a clear error
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidInputError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def plot_report(
    report: CalibrationReport, path: str | os.PathLike[str], *, alpha: float = 0.05
) -> None:
    """Each tier's correlation with its confidence interval, and its reward
    before and after calibration, as a PNG. Correlations with a p-value of
    ``alpha`` or more (the significance level the calibration used) are grey;
    a tier a reward table lacks gets a dash instead of a bar. The file is
    written beside ``path`` and renamed over it (its folder made if need be)."""
    plt = pyplot()
    tiers = [c.tier for c in report.correlations]
    x = np.arange(len(tiers))
    r = np.array([c.r for c in report.correlations])
    low = np.array([c.ci_low for c in report.correlations])
    high = np.array([c.ci_high for c in report.correlations])
    significant = np.array([c.p_value < alpha for c in report.correlations])
    # A tier whose variable is constant (presence: in no rollout or in all;
    # count: the same count in every one), or a buffer in which nothing
    # succeeded (or everything did), has no correlation to show an interval
    # for. A tier in every rollout has one for its count when that varies.
    stats = report.stats
    n, successes = stats.trajectories, stats.successes
    at = {tier: t for t, tier in enumerate(stats.tiers)}

    def varies(tier: str) -> bool:
        t = at[tier]
        if report.variable == "count":
            # Exact integers: n * sum c^2 - (sum c)^2 > 0 unless every count is equal.
            return n * int(stats.turns_sq[t]) - int(stats.turns[t]) ** 2 > 0
        return 0 < int(stats.present[t]) < n

    observed = np.array(
        [0 < successes < n and varies(c.tier) for c in report.correlations], dtype=bool
    )
    low = np.where(observed, low, r)
    high = np.where(observed, high, r)
    # A tier a table lacks has no bar (NaN draws none) and a dash, not a 0 bar.
    before = np.array([report.initial.rewards.get(t, math.nan) for t in tiers])
    after = np.array([report.rewards.get(t, math.nan) for t in tiers])

    fig, (ax_r, ax_w) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = np.where(significant, "tab:blue", "tab:gray")
    ax_r.bar(x, r, color=colors)
    # Error bars are never negative (matplotlib refuses them): an interval
    # that does not reach r, were one ever computed, is drawn as reaching it.
    yerr = np.clip([r - low, high - r], 0.0, None)
    ax_r.errorbar(x, r, yerr=yerr, fmt="none", ecolor="black", capsize=4)
    ax_r.axhline(0, color="black", linewidth=0.8)
    ax_r.set_xticks(x, tiers)
    ax_r.set_ylabel(f"point-biserial r of tier {report.variable} with success")
    ax_r.set_title(f"Tier vs success (n = {report.stats.trajectories}; grey: p >= {alpha:g})")

    width = 0.38
    ax_w.bar(x - width / 2, before, width, label="before", color="tab:orange")
    ax_w.bar(x + width / 2, after, width, label="calibrated", color="tab:green")
    for offset, values in ((-width / 2, before), (width / 2, after)):
        for missing in np.flatnonzero(np.isnan(values)):
            ax_w.annotate("—", (x[missing] + offset, 0.0), ha="center", va="bottom", color="gray")
    ax_w.axhline(0, color="black", linewidth=0.8)
    ax_w.set_xticks(x, tiers)
    ax_w.set_ylabel("tier reward")
    ax_w.set_title(
        f"Rewards ({report.estimator}; misaligned turns "
        f"{report.initial.misaligned} -> {report.best.misaligned})"
    )
    ax_w.legend()
    fig.tight_layout()
    try:
        _save_png_atomic(fig, path)
    finally:
        plt.close(fig)


def _save_png_atomic(fig: Any, path: str | os.PathLike[str]) -> None:
    """Save matplotlib figure ``fig`` as a PNG at ``path`` (its folder made if
    need be), whatever the name ends with: matplotlib would pick the format
    from the suffix, refuse an unknown one, and add ".png" to a name without.
    Written beside the name and renamed over it, as the tier file and the
    report are: an interrupted or failed save leaves the old plot, not part
    of a new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, dpi=120, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

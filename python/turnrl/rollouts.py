"""Rollout buffers: ``turnrl.rollout/1`` JSONL files, one trajectory per line.

Reading is done by the Rust core, without the GIL, plain or zstd-compressed
(recognised by the zstd magic bytes, whatever the file is called), several
files in parallel and each big file in parallel blocks. The main product is a
columnar :class:`RolloutBatch` that feeds :func:`turnrl.compute_advantages`
directly::

    batch = turnrl.read_rollouts("runs/step-*.jsonl.zst")
    adv = turnrl.compute_advantages(
        "gtpo_hybrid", batch.outcome, batch.group_index, batch.turn_rewards, batch.turn_offsets
    )

A bad line (invalid or truncated JSON, wrong schema, a missing or ill-typed
field, a non-finite number) is skipped and counted, and reported as
``"file:line: reason"``; every other line is kept. Blank lines are ignored
(they still count for line numbers). Keys the columns do not need (``meta``,
``content``, ``tool_calls``, unknown extras) are not checked by the columnar
reader; :func:`iter_rollout_records` returns them unchanged.

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
    "NO_TIER",
    "SCHEMA",
    "RolloutBatch",
    "RolloutRecordIterator",
    "RolloutWriter",
    "expand_paths",
    "iter_rollout_records",
    "read_rollouts",
    "read_taubench_results",
    "rollout_record",
    "taubench_to_records",
    "write_taubench_buffer",
]

SCHEMA = "turnrl.rollout/1"
"""The ``schema`` value of every record."""

DEFAULT_TIERS = ("gold", "soft", "read", "write", "error", "respond")
"""Tier names that always hold codes 0 to 5 in :attr:`RolloutBatch.tier_names`."""

NO_TIER = -1
"""Tier code of an assistant turn without a tier."""

PathArg = str | os.PathLike[str]
Paths = PathArg | Sequence[PathArg]


def expand_paths(paths: Paths) -> list[str]:
    """File names in the given order; glob patterns expand to sorted matches."""
    items: Sequence[PathArg] = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    out: list[str] = []
    for item in items:
        name = os.fspath(item)
        if any(c in name for c in "*?[") and not os.path.exists(name):
            matches = sorted(glob.glob(name))
            if not matches:
                raise TurnrlIOError(f"{name}: no such file: no file matches this pattern")
            out.extend(matches)
        else:
            out.append(name)
    if not out:
        raise InvalidInputError("no rollout files given")
    return out


@dataclass(frozen=True)
class RolloutBatch:
    """The columns of one or more rollout buffers.

    Trajectory ``i`` owns turns ``turn_offsets[i]:turn_offsets[i + 1]`` of
    ``turn_rewards`` and ``turn_tiers`` (assistant turns only). Strings are
    dictionary encoded in first-seen order: trajectory ``i``'s task is
    ``task_names[task_index[i]]``, its group ``group_names[group_index[i]]``;
    turn ``j``'s tier is ``tier_names[turn_tiers[j]]`` or none when the code
    is :data:`NO_TIER`. ``group_index`` is what
    :func:`turnrl.compute_advantages` takes as ``group``.
    """

    outcome: np.ndarray
    """float64 [B]: task reward R[i]."""
    sample: np.ndarray
    """int64 [B]: sample index within the group."""
    group_index: np.ndarray
    """int64 [B]: dense group id."""
    group_names: list[str]
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
        TurnrlIOError: a file is missing, unreadable, or not a valid zstd
            stream; the message names the path.
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


class RolloutRecordIterator(Iterator[dict[str, Any]]):
    """Full records (dicts) of rollout buffers, in file and line order.

    The same lines are kept and skipped as by :func:`read_rollouts`;
    ``skipped`` and ``problems`` grow as reading goes on.
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
        record: dict[str, Any] = json.loads(text)
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

    Records go to a temporary file next to ``path``, which replaces ``path``
    on :meth:`close`; used as a context manager, an exception inside the
    block aborts instead, leaving ``path`` as it was. Every record is checked
    against ``turnrl.rollout/1`` (the reader's own rules) before it is
    written; a bad one raises :class:`~turnrl.exceptions.InvalidInputError`
    and is not written.

    Args:
        path: the target file.
        compress: ``"zstd"``, ``None`` (plain), or ``"auto"`` (zstd when the
            name ends in ``.zst`` or ``.zstd``, plain otherwise).
        level: zstd level (1 to 22).
    """

    def __init__(self, path: PathArg, compress: Compress = "auto", *, level: int = 3) -> None:
        name = os.fspath(path)
        if compress == "auto":
            compress = "zstd" if name.endswith((".zst", ".zstd")) else None
        if compress not in (None, "zstd"):
            raise InvalidInputError(f"compress must be None, 'zstd' or 'auto', got {compress!r}")
        self.path = name
        self._writer = _core.RolloutFileWriter(name, compress or "none", level)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (a mapping in the ``turnrl.rollout/1`` layout)."""
        self._writer.write_line(self._encode(record))

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
        """Flush, sync and move the file into place (idempotent)."""
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


# ---------------------------------------------------------------------------
# tau-bench results


def _taubench_turn(message: Mapping[str, Any], where: str) -> dict[str, Any]:
    role = message.get("role")
    if not isinstance(role, str):
        raise InvalidInputError(f"{where}: message without a string 'role'")
    content = message.get("content")
    turn: dict[str, Any] = {"role": role, "content": "" if content is None else content}
    if role == "assistant":
        calls = []
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    pass  # kept as the raw string: a malformed call is data too
            calls.append(
                {"id": call.get("id"), "name": function.get("name"), "arguments": arguments}
            )
        if calls:
            turn["tool_calls"] = calls
        tier = message.get("tier")
        reward = message.get("reward")
        turn["tier"] = tier if isinstance(tier, str) else None
        turn["reward"] = (
            float(reward)
            if isinstance(reward, (int, float))
            and not isinstance(reward, bool)
            and math.isfinite(reward)
            else 0.0
        )
    elif role == "tool":
        turn["name"] = message.get("name")
        turn["tool_call_id"] = message.get("tool_call_id")
    return turn


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
    - ``sample``: the entry's ``trial`` (or ``info["trial"]``), else the
      order of appearance among entries of the same task;
    - ``outcome``: the entry's ``reward``;
    - ``turns``: the messages of ``traj`` without the system prompt (it is
      the same policy text in every entry; ``keep_system=True`` keeps it in
      ``meta["system_prompt"]``). Assistant turns get ``tool_calls`` as
      ``{"id", "name", "arguments"}`` with the arguments decoded from their
      JSON string (kept as the string when it is not valid JSON), and
      ``tier``/``reward`` from the message when present, else ``None``/0;
    - ``meta``: ``{"source": "tau-bench", "task_index", "trial", "info"}``;
      ``info`` holds tau-bench's task (with its gold actions) and reward info.
    """
    prefix = "/".join(p for p in (env, split) if p)
    seen: dict[str, int] = {}
    records = []
    for index, entry in enumerate(results):
        where = f"{source}: entry {index}"
        if not isinstance(entry, Mapping):
            raise InvalidInputError(f"{where}: expected an object, got {type(entry).__name__}")
        if "task_id" not in entry:
            raise InvalidInputError(f"{where}: missing 'task_id'")
        reward = entry.get("reward")
        if isinstance(reward, bool) or not isinstance(reward, (int, float)):
            raise InvalidInputError(f"{where}: 'reward' must be a number, got {reward!r}")
        if not math.isfinite(reward):
            raise InvalidInputError(f"{where}: 'reward' is not finite")
        info = entry.get("info") or {}
        if not isinstance(info, Mapping):
            raise InvalidInputError(f"{where}: 'info' must be an object")
        traj = entry.get("traj") or []
        if not isinstance(traj, list):
            raise InvalidInputError(f"{where}: 'traj' must be a list")
        task = str(entry["task_id"])
        task_id = f"{prefix}/{task}" if prefix else task
        trial = entry.get("trial", info.get("trial"))
        if isinstance(trial, bool) or not isinstance(trial, int):
            trial = None
        sample = trial if trial is not None else seen.get(task_id, 0)
        seen[task_id] = seen.get(task_id, 0) + 1
        meta: dict[str, Any] = {
            "source": "tau-bench",
            "task_index": entry["task_id"],
            "trial": trial,
            "info": dict(info),
        }
        turns = []
        for k, message in enumerate(traj):
            if not isinstance(message, Mapping):
                raise InvalidInputError(f"{where}: traj[{k}] is not an object")
            if message.get("role") == "system":
                if keep_system:
                    meta["system_prompt"] = message.get("content")
                continue
            turns.append(_taubench_turn(message, f"{where}: traj[{k}]"))
        records.append(rollout_record(task_id, task_id, sample, float(reward), turns, meta))
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
        with open(name, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise TurnrlIOError(f"{name}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{name}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
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
    """Convert a tau-bench results file into a rollout buffer; returns the record count."""
    records = read_taubench_results(results_path, env, split, keep_system=keep_system)
    with RolloutWriter(out_path, compress) as writer:
        return writer.write_many(records)

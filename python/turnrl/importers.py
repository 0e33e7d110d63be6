"""Bring rollouts people already have into turnrl's buffer format, with tiers.

tau-bench writes its runs as a JSON list of ``{task_id, reward, info, traj}``.
:func:`import_taubench` converts each entry to a ``turnrl.rollout/1`` record,
labels every assistant turn with its reward tier against the task's gold
actions (deep argument comparison, each gold action matched once), and sets
the turn's reward from a tier table, so Iterative Reward Calibration can run
on existing results.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from turnrl.calibration import load_tier_rewards, tier_reward
from turnrl.exceptions import InvalidInputError

__all__ = ["ImportSummary", "import_taubench"]


@dataclass
class ImportSummary:
    """What an import did: records written and tier counts over their turns."""

    records: int = 0
    tiers: Counter[str] = field(default_factory=Counter)
    unlabelled: int = 0


def _task_at(domain: Any, task_ref: Any) -> Any:
    """tau-bench (v1): ``task_id`` is the task's position in the split (its
    ``run.py`` numbers the split's tasks from 0)."""
    try:
        index = int(task_ref)
    except (TypeError, ValueError):
        raise InvalidInputError(f"task_id {task_ref!r} is not a task index") from None
    # Outside the split, the domain says so and gives the range (its error is
    # a ValueError too: caught above, it read as a task_id of the wrong kind).
    return domain.task(index)


def _tau2_task_finder(domain: Any) -> Any:
    """tau2-bench: ``task_id`` is the task's own id (a string, ``"6"``), which
    is not its position in the split (airline's test split starts with tasks
    "2", "6", "8"): the task is looked up by id. An integer ``task_id`` (tau2
    writes strings) is taken as an id too, but refused when it is also the
    position of another task of the split: which one was meant cannot be told."""
    by_id = {str(t.facts.get("tau2_id")): t for t in domain.tasks}

    def find(domain: Any, task_ref: Any) -> Any:
        task = by_id.get(str(task_ref))
        if task is None:
            raise InvalidInputError(
                f"task_id {task_ref!r} is not the id of a task in {domain.name}'s split "
                f"(its {len(by_id)} task ids: {_some(list(by_id))}); tau2 task ids are "
                "not positions in the split: is the split the run's (--split)?"
            )
        if isinstance(task_ref, int) and 0 <= task_ref < len(domain.tasks):
            at = domain.tasks[task_ref]
            if at is not task:
                raise InvalidInputError(
                    f"task_id {task_ref!r} is ambiguous: tau2 task {str(task_ref)!r} is "
                    f"{task.id}, but the split's task at position {task_ref} is {at.id}; "
                    "tau2 results name tasks by their id as a string: write it so"
                )
        return task

    return find


def _some(names: list[str], shown: int = 8) -> str:
    """The first few of ``names`` for a message."""
    head = ", ".join(repr(n) for n in names[:shown])
    return head + (", ..." if len(names) > shown else "")


def import_taubench(
    results_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    env: str,
    *,
    root: str | os.PathLike[str] | None = None,
    split: str | None = None,
    tiers: Mapping[str, float] | str = "naive",
    compress: str = "auto",
) -> ImportSummary:
    """Label a tau-bench results file and write it as a rollout buffer.

    Args:
        results_path: tau-bench's results JSON.
        out_path: the buffer to write (``.zst`` compresses with ``"auto"``),
            atomically.
        env: the domain the results come from (``taubench:airline``, ...);
            its tools say which calls are reads and writes and its tasks
            hold the gold actions.
        root: the tau-bench (or tau2-bench) checkout the domain loads from.
        split: the task split the run used (the domain's default if None).
            An entry's ``task_id`` is the task's position in that split for
            tau-bench domains (as tau-bench numbers them) and the task's own
            id for tau2 domains (``"6"`` is tau2's task 6, whatever its
            position; an integer that is both an id and the position of
            another task is refused as ambiguous).
        tiers: tier rewards (a preset name, a TOML file or a mapping) that
            set each assistant turn's ``reward``; a tier it lacks is an error
            naming the entry, not a 0.

    Raises:
        InvalidInputError: ``out_path`` is ``results_path`` (by any path to
            it), an entry whose task (index or tau2 id) is not in
            the split, or
            a malformed results file or entry (one whose turns the labelling
            refuses, e.g. text with a lone surrogate, included): the message
            names the file and the entry, and nothing is written.
    """
    from turnrl import envs
    from turnrl.args import label_tiers
    from turnrl.rollouts import (
        RESULTS_REPLACED,
        RolloutWriter,
        _check_not_input,
        read_taubench_results,
    )

    _check_not_input(out_path, results_path, RESULTS_REPLACED)
    domain = envs.load(env, root=root, split=split)
    rewards = load_tier_rewards(tiers)
    tool_kinds = domain.tool_kinds
    records = read_taubench_results(results_path, env=env.split(":")[-1], split=split)
    find_task = _tau2_task_finder(domain) if domain.name.startswith("tau2:") else _task_at
    summary = ImportSummary()
    with RolloutWriter(out_path, compress=compress) as writer:
        for index, record in enumerate(records):
            task_ref: Any = record["meta"].get("task_index")
            try:
                task = find_task(domain, task_ref)
            except InvalidInputError as err:
                raise InvalidInputError(f"{results_path}: entry {index}: {err}") from None
            # The domain's own id names the split ("airline/test/12"); trials
            # of one task form its group.
            record["task_id"] = record["group"] = task.id
            # An entry the labelling refuses (text with a lone surrogate,
            # which no buffer can hold) stops the import like any other
            # malformed entry: named, and nothing written.
            try:
                labels = label_tiers(record["turns"], task.gold_actions, tool_kinds)
            except InvalidInputError as err:
                raise InvalidInputError(
                    f"{results_path}: entry {index} (task_id {task_ref!r}): {err}"
                ) from None
            for turn, tier in zip(record["turns"], labels.tiers, strict=True):
                if turn.get("role") != "assistant":
                    continue
                if tier is None:
                    summary.unlabelled += 1
                    continue
                turn["tier"] = tier
                turn["reward"] = tier_reward(
                    rewards, tier, f"{results_path}: entry {index} (task_id {task_ref!r})"
                )
                summary.tiers[tier] += 1
            record["meta"]["gold_matched"] = list(labels.matched_gold)
            writer.write(record)
            summary.records += 1
    return summary

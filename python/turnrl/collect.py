"""Collect rollouts: episodes of a policy with a simulated user, written as a buffer.

The policy and the user are usually chat models behind OpenAI-compatible
endpoints (a ``vllm serve`` policy, any user model): episodes wait on the
network, so several run at once on threads. Each record carries its turns'
reward tiers and tier rewards, ready for ``turnrl calibrate`` and the
advantage estimators. ``turnrl rollouts collect`` is the command line form.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from turnrl.envs._base import Domain, Task
from turnrl.envs.judge import NLJudge
from turnrl.envs.runner import Agent, _check_episode_options, run_episode
from turnrl.envs.users import User
from turnrl.exceptions import InvalidInputError

__all__ = ["CollectSummary", "collect_rollouts", "episode_tier_rewards", "select_tasks"]


@dataclass
class CollectSummary:
    """What :func:`collect_rollouts` wrote and what failed."""

    records: int = 0
    outcomes: list[float] = field(default_factory=list)
    #: The written episodes' outcomes by task id, in the order they finished;
    #: every task asked for has an entry, empty when none of its episodes was written.
    task_outcomes: dict[str, list[float]] = field(default_factory=dict)
    tiers: Counter[str] = field(default_factory=Counter)
    stop_reasons: Counter[str] = field(default_factory=Counter)
    #: Tool calls left unrun, past ``calls_per_message`` or after a call that
    #: ended the episode (tau-bench's transfer), over the written episodes.
    dropped_calls: int = 0
    #: (task id, sample, error) of each episode that raised; none of them is written.
    failures: list[tuple[str, int, str]] = field(default_factory=list)
    #: Why the episodes not yet started were cancelled; None if all ran (the
    #: latest collection's, as ``finished`` is).
    aborted: str | None = None
    #: True once the collection has ended on its own (every episode ended, or
    #: the rest were cancelled after failures) and the buffer is closed: an
    #: interrupt raised after that lost nothing. Set False as a collection
    #: starts, so a summary passed again speaks of the latest one.
    finished: bool = False
    #: The written records as they were in memory, sampled token ids
    #: (``completion_ids``) included, when ``keep_records`` was asked for.
    kept: list[dict[str, Any]] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        """Mean outcome of the written episodes (0 when none)."""
        return sum(self.outcomes) / len(self.outcomes) if self.outcomes else 0.0

    def pass_hat_k(self, k: int) -> float:
        """tau-bench's pass^k of the written episodes (:func:`turnrl.envs.pass_hat_k`):
        the chance that k episodes of a task all succeed, averaged over tasks.

        Raises:
            InvalidInputError: no episode was written, tasks have different
                numbers of written episodes, or k is not in 1..that number.
        """
        from turnrl.envs import pass_hat_k

        counts = {len(outs) for outs in self.task_outcomes.values()}
        if len(counts) > 1:
            raise InvalidInputError(
                f"pass_hat_k: tasks have from {min(counts)} to {max(counts)} written episodes "
                "(failed episodes are not written; a task listed twice has twice the samples); "
                "pass^k needs as many for every task"
            )
        results = [(task, o) for task, outs in self.task_outcomes.items() for o in outs]
        return pass_hat_k(results, k)


def select_tasks(domain: Domain, spec: str) -> list[Task]:
    """Tasks by a spec: ``all``, ``START:STOP`` (indices, either side optional,
    negative ones counted from the end, within the domain's task count) or
    comma-separated indices and task ids."""
    spec = spec.strip()
    if spec in ("", "all"):
        return list(domain.tasks)
    if ":" in spec and "," not in spec:
        start_text, _, stop_text = spec.partition(":")
        try:
            start = int(start_text) if start_text.strip() else None
            stop = int(stop_text) if stop_text.strip() else None
        except ValueError:
            raise InvalidInputError(
                f"tasks {spec!r}: a range is START:STOP with integers"
            ) from None
        count = len(domain.tasks)
        for bound in (start, stop):
            # Python would clip silently, and a run would train on fewer
            # tasks than it names.
            if bound is not None and not -count <= bound <= count:
                raise InvalidInputError(
                    f"tasks {spec!r}: {domain.name} has {count} tasks, so a range's bounds "
                    f"lie in -{count}..{count} (leave STOP out to run to the last task)"
                )
        chosen = domain.tasks[start:stop]
        if not chosen:
            raise InvalidInputError(
                f"tasks {spec!r} selects none of {domain.name}'s {len(domain.tasks)} tasks"
            )
        return list(chosen)
    chosen = []
    for part in spec.split(","):
        part = part.strip()
        chosen.append(domain.task(int(part) if part.lstrip("-").isdigit() else part))
    return chosen


def episode_tier_rewards(tiers: str | Mapping[str, float]) -> dict[str, float]:
    """The reward table ``tiers`` (a preset name, a TOML file or a mapping, as
    :func:`turnrl.calibration.load_tier_rewards` reads it), refused with an
    :class:`InvalidInputError` naming what is missing unless it rewards each of
    the six tiers turnrl's labeller gives episodes' turns."""
    from turnrl.calibration import DEFAULT_TIERS, load_tier_rewards

    rewards = load_tier_rewards(tiers)
    missing = [tier for tier in DEFAULT_TIERS if tier not in rewards]
    if missing:
        where = "tiers" if isinstance(tiers, Mapping) else f"tiers {tiers}"
        raise InvalidInputError(
            f"{where}: no reward for tier {', '.join(missing)} (the table has "
            f"{', '.join(rewards)}; episodes are labelled {', '.join(DEFAULT_TIERS)})"
        )
    return rewards


def collect_rollouts(
    domain: Domain,
    make_agent: Callable[[], Agent],
    make_user: Callable[[], User],
    out: str | os.PathLike[str],
    *,
    tasks: Sequence[int | str | Task] | None = None,
    samples: int = 1,
    tiers: str | os.PathLike[str] | Mapping[str, float] = "naive",
    max_steps: int | None = None,
    calls_per_message: int | None = None,
    nl_judge: NLJudge | None = None,
    workers: int = 4,
    group_prefix: str = "",
    max_consecutive_failures: int | None = 16,
    progress: bool = True,
    summary: CollectSummary | None = None,
    keep_records: bool = False,
    on_episode: Callable[[int, int], None] | None = None,
) -> CollectSummary:
    """Run ``samples`` episodes of each task and write them to the buffer ``out``.

    ``make_agent()`` and ``make_user()`` give a fresh agent and user per
    episode (users keep the conversation). Episodes run on ``workers``
    threads; each task's samples form one group, ``group_prefix`` + the task
    id (a prefix such as ``"step-0001/"`` keeps different policies' samples
    of a task apart when buffers are read together); a task listed ``k``
    times gets ``k * samples``, numbered on in its group. ``tiers`` (a preset,
    TOML file or mapping) gives the per-turn rewards written beside the tiers;
    it must name each of the labeller's tiers (gold, soft, read, write, error,
    respond), since a tier it lacks would otherwise count 0 unseen.
    ``max_steps`` and ``calls_per_message`` are passed to
    :func:`turnrl.envs.run_episode` (``calls_per_message=1`` runs only the
    first call of a message, as tau-bench's tool-calling agent does).

    Nothing finished is lost, and nothing is written over for nothing:

    * An episode that raises (an endpoint down, a judge's unusable reply) is
      counted in ``failures`` with its error and not written; the others are.
      A judge is asked only about otherwise successful episodes, so its
      failures leave out successes: check ``failures`` before trusting the
      success rate.
    * After ``max_consecutive_failures`` failures in a row (None: never) the
      episodes not yet started are cancelled (``aborted`` says why); those
      finished are written.
    * An interrupt (Ctrl-C) cancels the episodes not yet started, waits for
      those running, writes those finished and raises again. One that comes
      while an episode is written and counted waits until it is, so
      ``summary.records`` counts what the buffer holds. One that comes as
      the buffer is closed at the end still raises, after the close, with
      ``summary.finished`` set: nothing was lost.
    * With no episode to write, ``out`` is left as it was.

    ``summary`` (optional) is filled in place, so a caller still has it when
    an interrupt propagates. One passed again adds this collection's counts
    to those it holds; ``aborted`` and ``finished`` say how this one ended.

    The sampled token ids an agent keeps on its turns (``completion_ids``,
    and the sampler's ``completion_logprobs``) are not written: buffers hold
    text. With ``keep_records``, the records
    written are also kept in ``summary.kept`` with their ids, for training
    on them in the same process (:func:`turnrl.train.train_loop`).

    ``on_episode(finished, total)`` is called after each episode ends,
    written or failed (:func:`turnrl.train.train_loop` shows it in its
    progress bar).

    The buffer is written atomically (see :class:`turnrl.RolloutWriter`), its
    folder created if need be.
    """
    from turnrl.rollouts import RolloutWriter

    if samples < 1:
        raise InvalidInputError(f"samples must be at least 1, got {samples}")
    if workers < 1:
        raise InvalidInputError(f"workers must be at least 1, got {workers}")
    # Checked before any episode starts: in run_episode it would fail each
    # episode in turn, counted as failures, rather than raise.
    _check_episode_options(max_steps, calls_per_message)
    if max_consecutive_failures is not None and max_consecutive_failures < 1:
        raise InvalidInputError(
            f"max_consecutive_failures must be at least 1 or None, got {max_consecutive_failures}"
        )
    # run_episode refuses a tier its table lacks, failing each episode that holds
    # one: a table without one of them is refused here, before any episode runs.
    rewards = episode_tier_rewards(tiers)
    # A task listed twice (a training step's draw across two passes over the
    # pool) gets twice the samples, numbered on in its one group: two runs of
    # sample 0 would be two records with the same (group, sample).
    listed: dict[str, tuple[Task, int]] = {}
    for ref in domain.tasks if tasks is None else tasks:
        task = domain.task(ref)
        listed[task.id] = (task, listed[task.id][1] + 1 if task.id in listed else 1)
    jobs = [(task, sample) for task, times in listed.values() for sample in range(times * samples)]
    summary = CollectSummary() if summary is None else summary
    # How this collection ends, not an earlier one (a summary passed again):
    # the interrupt handler below trusts finished to mean everything is
    # written, and a set aborted would keep failures in a row from cancelling.
    summary.finished, summary.aborted = False, None
    for task_id in listed:
        summary.task_outcomes.setdefault(task_id, [])

    def episode(task: Task, sample: int) -> dict[str, Any]:
        return run_episode(
            make_agent(),
            domain,
            task,
            make_user(),
            max_steps,
            tier_rewards=rewards,
            group=group_prefix + task.id,
            sample=sample,
            nl_judge=nl_judge,
            calls_per_message=calls_per_message,
        )

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    writer = RolloutWriter(out)
    pool = ThreadPoolExecutor(max_workers=workers)
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="episode", desc=f"collect {domain.name}")
    # An episode is taken once it is written and counted (or counted as
    # failed), never before: the interrupt handler below takes every finished
    # episode not taken yet, and one that is in the buffer is not written twice.
    taken: set[Any] = set()
    written: set[Any] = set()

    def take(future: Any) -> bool:
        """Write and count one finished episode; True if it failed."""
        task_id, sample = futures[future]
        try:
            record = future.result()
        except Exception as e:  # any episode's failure is reported, the others kept
            with _interrupts_held():
                summary.failures.append((task_id, sample, f"{type(e).__name__}: {e}"))
                taken.add(future)
            return True
        except BaseException:  # the episode itself was interrupted: nothing to write
            taken.add(future)
            raise
        # Ctrl-C waits while the record is written and counted, so that the
        # summary always counts what the buffer holds.
        with _interrupts_held():
            if future not in written:
                before = writer.written
                try:
                    writer.write(_without_token_ids(record))
                except InvalidInputError as e:  # a record the buffer format refuses
                    summary.failures.append((task_id, sample, f"not written: {e}"))
                    taken.add(future)
                    return True
                finally:
                    if writer.written > before:
                        written.add(future)
            _count(summary, record, task_id, keep_records)
            taken.add(future)
        return False

    futures: dict[Any, tuple[str, int]] = {}
    in_a_row = 0
    try:
        for task, sample in jobs:
            futures[pool.submit(episode, task, sample)] = (task.id, sample)
        for future in as_completed(futures):
            if future.cancelled():
                continue
            in_a_row = in_a_row + 1 if take(future) else 0
            if (
                summary.aborted is None
                and max_consecutive_failures is not None
                and in_a_row >= max_consecutive_failures
            ):
                summary.aborted = f"{in_a_row} episodes failed in a row"
                for other in futures:
                    other.cancel()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(success=f"{summary.success_rate:.2f}", failed=len(summary.failures))
            if on_episode is not None:
                on_episode(len(taken), len(jobs))
        pool.shutdown(wait=True)
        with _interrupts_held():
            _finish(writer, summary)
            summary.finished = True
    except BaseException:
        if summary.finished:  # Ctrl-C held back while the buffer closed: all is written
            raise
        summary.aborted = "interrupted"
        running = sum(f.running() for f in futures)
        if running and bar is not None:
            bar.write(
                f"interrupted: waiting for {running} running episode(s) to finish, to keep "
                "them too; interrupt again to write the finished ones now (the running "
                "ones still end before the process does, and are not kept)"
            )
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        except BaseException:  # interrupted again: keep what has finished, wait no more
            pool.shutdown(wait=False, cancel_futures=True)
        finally:
            # Whatever happens, the finished episodes are written: a further
            # Ctrl-C waits until they are.
            with _interrupts_held():
                for future in futures:
                    if future.done() and not future.cancelled() and future not in taken:
                        if isinstance(future.exception(), (Exception, type(None))):
                            take(future)
                        else:  # the episode itself was interrupted: nothing to write
                            taken.add(future)
                _finish(writer, summary)
        raise
    finally:
        if bar is not None:
            bar.close()
    return summary


def _count(summary: CollectSummary, record: dict[str, Any], task_id: str, keep: bool) -> None:
    """Add a written record to the summary."""
    if keep:
        summary.kept.append(record)
    summary.records += 1
    summary.outcomes.append(float(record["outcome"]))
    summary.task_outcomes.setdefault(task_id, []).append(float(record["outcome"]))
    summary.stop_reasons[record["meta"]["stop_reason"]] += 1
    summary.dropped_calls += record["meta"]["dropped_calls"]
    for turn in record["turns"]:
        if turn["role"] == "assistant" and turn.get("tier") is not None:
            summary.tiers[str(turn["tier"])] += 1


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back until the block ends, then deliver it to the
    handler that was there (Python's raises KeyboardInterrupt after the block).

    Only the main thread receives signals; elsewhere the block just runs.
    Nested blocks hold it until the outermost ends.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is None  # a handler not set from Python
    ):
        yield
        return
    caught: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except ValueError:  # not the main interpreter's main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)


_IN_MEMORY_ONLY = ("completion_ids", "completion_logprobs")


def _without_token_ids(record: dict[str, Any]) -> dict[str, Any]:
    """The record without its turns' ``completion_ids`` and ``completion_logprobs``
    (a copy only when it has some)."""
    if not any(key in t for t in record["turns"] for key in _IN_MEMORY_ONLY):
        return record
    turns = [{k: v for k, v in t.items() if k not in _IN_MEMORY_ONLY} for t in record["turns"]]
    return {**record, "turns": turns}


def _finish(writer: Any, summary: CollectSummary) -> None:
    if writer.closed:  # finished already, when Ctrl-C came just after
        return
    if summary.records:
        writer.close()
    else:
        writer.abort()

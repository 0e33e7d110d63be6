"""The ``turnrl`` command line."""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from turnrl import __version__
from turnrl.advantages import estimator_names

if TYPE_CHECKING:
    from pathlib import Path

    from turnrl.calibration import OnlineCalibrator
    from turnrl.train import Evaluation


def _print_correlations(correlations) -> None:
    print(
        f"  {'tier':<8} {'support':>8} {'succ with':>10} {'succ w/o':>9} {'r_pb':>7}"
        f" {'p':>9} {'95% CI':>16}"
    )
    for c in correlations:
        print(
            f"  {c.tier:<8} {c.support:>8} {c.success_with:>10.3f} {c.success_without:>9.3f}"
            f" {c.r:>+7.3f} {c.p_value:>9.2e} [{c.ci_low:>+6.3f}, {c.ci_high:>+6.3f}]"
        )


def _print_iteration(label: str, iteration) -> None:
    print(
        f"  {label}: misaligned turns {iteration.misaligned}"
        f" ({'aligned' if iteration.aligned else 'NOT aligned'})"
    )
    for d in iteration.directions:
        flag = "" if d.aligned else "  <- wrong sign"
        print(
            f"    {d.tier:<8} reward {d.reward:>+6.3f}  turns {d.turns:>6}"
            f"  mean adv {d.mean_advantage:>+7.3f}  misaligned {d.misaligned:>5}{flag}"
        )


def _demo(args: argparse.Namespace) -> int:
    from turnrl.calibration import calibrate
    from turnrl.demo import generate

    rollouts = generate(tasks=args.tasks, group_size=args.group_size, seed=args.seed)
    print(
        f"{len(rollouts.outcome)} synthetic rollouts ({args.tasks} tasks x "
        f"{args.group_size}), {rollouts.num_turns} assistant turns, success rate "
        f"{rollouts.outcome.mean():.2f}\n"
    )
    for estimator in args.estimators:
        report = calibrate(rollouts, "naive", estimator=estimator, turn_norm=args.turn_norm)
        if estimator == args.estimators[0]:
            print("Tier presence vs task success (point-biserial):")
            _print_correlations(report.correlations)
        print(f"\n{estimator} (turn_norm={args.turn_norm})")
        _print_iteration("naive dense rewards", report.initial)
        for it in report.iterations:
            rewards = " ".join(f"{tier}={value:+.2f}" for tier, value in it.rewards.items())
            print(f"  round {it.index}: misaligned {it.misaligned:>6}  {rewards}")
        _print_iteration(f"calibrated (round {report.best.index})", report.best)
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import os

    from tqdm import tqdm

    from turnrl.advantages import compute_advantages, probe_batch
    from turnrl.calibration import calibrate, load_tier_rewards, save_tier_rewards
    from turnrl.irc import (
        load_buffers,
        plot_report,
        pyplot,
        repeated_samples,
        write_json_atomic,
    )
    from turnrl.rollouts import expand_paths

    paths = expand_paths(args.buffers)
    initial = load_tier_rewards(args.tiers)
    # Checked before the (possibly long) calibration, not after it.
    _check_outputs([("--out", args.out), ("--report", args.report), ("--plot", args.plot)], paths)
    # The report or plot over the --tiers file would replace the table with
    # JSON or a PNG; --out over it is the table calibrated in place.
    if os.path.isfile(args.tiers):
        from turnrl.rollouts import _check_not_input

        for option, target in (("--report", args.report), ("--plot", args.plot)):
            if target is not None:
                _check_not_input(
                    target, args.tiers, "the output cannot replace the --tiers file", option
                )
    if args.plot:
        pyplot()
    _note_unused_estimator_options(args, "calibrate")
    # Estimator settings it refuses (--gamma 2, --lam 1e308) are found before
    # the buffers are read, on a small batch.
    compute_advantages(args.estimator, *probe_batch(), **_estimator_params(args))
    total = sum(os.path.getsize(p) for p in paths)
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="reading", disable=args.quiet or None
    ) as bar:
        rollouts, stats, shards = load_buffers(
            paths,
            workers=args.workers,
            ray_address=args.ray,
            success_threshold=args.success_threshold,
            progress=bar.update,
        )
    skipped = sum(s.skipped for s in shards)
    problems = [p for s in shards for p in s.problems]
    if skipped:
        print(f"skipped {skipped} bad line(s):", file=sys.stderr)
        for line in problems[:20]:
            print(f"  {line}", file=sys.stderr)
        if skipped > 20:
            # The reader keeps the first 1000 problems of each file, all counted.
            listed = (
                "all listed in --report"
                if len(problems) == skipped
                else f"--report lists {len(problems)} of the {skipped}: at most 1000 per file"
            )
            print(f"  ... and {skipped - 20} more ({listed})", file=sys.stderr)
    if len(rollouts.outcome) == 0:
        hint = _results_hint(paths, problems)
        print(
            f"turnrl calibrate: error: no trajectories in {len(paths)} input file(s){hint}",
            file=sys.stderr,
        )
        return 2
    # Said on stderr and kept in --report, not refused: what the method gives
    # such data, but rarely what was meant.
    warnings: list[str] = []

    def warn(text: str) -> None:
        print(f"turnrl calibrate: warning: {text}", file=sys.stderr)
        warnings.append(text)

    if stats.successes in (0, stats.trajectories):
        # Nothing to correlate with: every r_pb is undefined (0), so every
        # calibrated reward comes out 0.
        which = "no trajectory" if stats.successes == 0 else "every trajectory"
        warn(
            f"{which} of {stats.trajectories} succeeded (outcome >= --success-threshold "
            f"{args.success_threshold:g}): tier presence cannot be correlated with success, "
            "and every calibrated tier reward is 0; calibrate on rollouts with both outcomes"
        )
    repeats = repeated_samples(shards, rollouts)
    if repeats is not None:
        warn(_repeats_warning(repeats))
    if not (rollouts.turn_tiers >= 0).any():
        # No tier is present anywhere: every r_pb is 0 again, and every tier
        # is exempt, so the loop "converges" at once.
        turns = rollouts.num_turns
        which = f"none of the {turns} assistant turns has a tier" if turns else "no assistant turns"
        warn(
            f"{which}: there is nothing to calibrate, and every calibrated tier reward is 0; "
            "give buffers with tier-labelled turns, as turnrl rollouts collect and "
            "import-taubench write them"
        )
    report = calibrate(
        rollouts,
        initial,
        estimator=args.estimator,
        target=args.target,
        alpha=args.alpha,
        min_abs_r=args.min_abs_r,
        max_iterations=args.max_iterations,
        variable=args.variable,
        stats=stats,
        **_estimator_params(args),
    )
    print(
        f"{stats.trajectories} trajectories, {rollouts.num_turns} assistant turns, "
        f"success rate {stats.successes / stats.trajectories:.3f}; estimator {args.estimator}"
    )
    _print_calibration_table(report)
    print(
        f"misaligned turns: {report.initial.misaligned} with the input rewards, "
        f"{report.best.misaligned} calibrated (round {report.best.index} of "
        f"{len(report.iterations)}; {'converged' if report.converged else 'NOT converged'})"
    )
    if args.out:
        save_tier_rewards(
            report.rewards,
            args.out,
            comment=f"calibrated by turnrl calibrate ({args.estimator}) from "
            f"{stats.trajectories} trajectories",
        )
        print(f"wrote {args.out}")
    if args.report:
        data = report.to_dict()
        data.update(inputs=paths, skipped_lines=skipped, problems=problems, warnings=warnings)
        write_json_atomic(data, args.report)
        print(f"wrote {args.report}")
    if args.plot:
        plot_report(report, args.plot, alpha=args.alpha)
        print(f"wrote {args.plot}")
    return 0


def _check_outputs(outputs: Sequence[tuple[str, str | None]], inputs: Sequence[str]) -> None:
    """Refuse, before anything is read, an output (``(option, name)``; None:
    not asked for) that cannot be written (a folder, or under a file), that is
    one of the ``inputs`` (by any path to it), or that another output names."""
    import os

    from turnrl.exceptions import InvalidInputError
    from turnrl.rollouts import _check_not_input, _same_path

    given = [(option, target) for option, target in outputs if target is not None]
    for k, (option, target) in enumerate(given):
        if os.path.isdir(target):
            raise InvalidInputError(f"{option} {target}: is a folder; give a file name")
        parent = os.path.dirname(os.path.abspath(target))
        while not os.path.exists(parent):  # folders that do not exist yet are made
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise InvalidInputError(f"{option} {target}: {parent} is a file, not a folder")
        # Written over an input it would replace the rollouts; over another
        # output, that output.
        for path in inputs:
            _check_not_input(target, path, "the output cannot replace the input buffer", option)
        for earlier, name in given[:k]:
            if _same_path(target, name):
                raise InvalidInputError(
                    f"{option} {target}: {earlier} {name} writes the same file; give each "
                    "output its own name"
                )


def _print_calibration_table(report) -> None:
    before = {d.tier: d for d in report.initial.directions}
    after = {d.tier: d for d in report.best.directions}
    print(
        f"  {'tier':<10} {'present':>8} {'succ with':>9} {'succ w/o':>8} {'r':>7} {'p':>9}"
        f" {'old':>7} {'new':>7} {'misaligned':>15}"
    )
    for c in report.correlations:
        old, new = before[c.tier], after[c.tier]
        # A tier the table lacks is shown as missing, not as the 0 it is counted as.
        old_reward = _table_reward(report.initial.rewards, c.tier)
        new_reward = _table_reward(report.best.rewards, c.tier)
        print(
            f"  {c.tier:<10} {c.support:>8} {c.success_with:>9.3f} {c.success_without:>8.3f}"
            f" {c.r:>+7.3f} {c.p_value:>9.2e} {old_reward:>7} {new_reward:>7}"
            f" {old.misaligned:>7} -> {new.misaligned:<5}"
        )


def _table_reward(rewards: Mapping[str, float], tier: str) -> str:
    """A tier's reward as the calibration table prints it: "—" when the table lacks it."""
    return f"{rewards[tier]:+.3f}" if tier in rewards else "—"


def _import_taubench(args: argparse.Namespace) -> int:
    from turnrl.importers import import_taubench
    from turnrl.rollouts import RESULTS_REPLACED, _check_not_input

    _check_not_input(args.out, args.results, RESULTS_REPLACED, "--out")
    summary = import_taubench(
        args.results, args.out, args.env, root=args.root, split=args.split, tiers=args.tiers
    )
    counts = ", ".join(f"{tier} {n}" for tier, n in summary.tiers.most_common())
    if counts:
        turns = f"assistant turns by tier: {counts}"
    else:
        turns = "no labelled assistant turns" if summary.unlabelled else "no assistant turns"
    print(
        f"wrote {summary.records} rollouts to {args.out}; {turns}"
        + (f"; {summary.unlabelled} unlabelled" if summary.unlabelled else "")
    )
    return 0


def _results_hint(files: Sequence[str], problems: Sequence[str]) -> str:
    """When files with bad lines hold a JSON list, as a tau-bench results file
    (one list of runs) does, the command that converts such a file."""
    listed = [
        name
        for name in files
        if any(p.startswith(f"{name}:") for p in problems) and _starts_a_json_list(name)
    ]
    if not listed:
        return ""
    return (
        f"; {', '.join(listed)} holds a JSON list, as tau-bench's results files do: convert "
        "one with turnrl rollouts import-taubench RESULTS --env ... --out BUFFER"
    )


def _starts_a_json_list(path: str) -> bool:
    """Whether the file's text starts with ``[``: a JSON list, on one line or (as
    tau-bench writes its results, with indent=2) over many, which no line of a
    buffer is."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")


def _stats(args: argparse.Namespace) -> int:
    import json
    import os

    from tqdm import tqdm

    from turnrl.calibration import check_success_threshold
    from turnrl.rollouts import (
        _stop_reason_labels,
        buffer_stats,
        expand_paths,
        plot_buffer_stats,
        read_rollouts,
    )

    check_success_threshold(args.success_threshold)
    paths = expand_paths(args.buffers)
    # Checked before the buffers are read, not after.
    _check_outputs([("--plot", args.plot)], paths)
    if args.plot:
        from turnrl.irc import pyplot

        pyplot()  # matplotlib missing: said now
    total = sum(os.path.getsize(p) for p in paths)
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="reading", disable=args.quiet or None
    ) as bar:
        batch = read_rollouts(paths, workers=args.workers, on_progress=bar.update)
    for problem in batch.problems[:20]:
        print(f"skipped {problem}", file=sys.stderr)
    if batch.skipped > 20:
        print(f"skipped {batch.skipped - 20} more bad line(s)", file=sys.stderr)
    stats = buffer_stats(batch, args.success_threshold)
    if stats["repeated_samples"] is not None:
        warning = _repeats_warning(stats["repeated_samples"])
        print(f"turnrl rollouts stats: warning: {warning}", file=sys.stderr)
    if args.plot:
        plot_buffer_stats(stats, args.plot)
        # stdout holds only the JSON under --json.
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    skipped = f" ({stats['skipped_lines']} bad lines skipped)" if stats["skipped_lines"] else ""
    if not stats["trajectories"]:
        hint = _results_hint(batch.files, batch.problems)
        print(f"no trajectories in {stats['files']} file(s){skipped}{hint}")
        return 0
    sizes = stats["group_size"]
    print(
        f"{stats['trajectories']} trajectories in {stats['files']} file(s){skipped}; "
        f"{stats['tasks']} tasks, {stats['groups']} groups of "
        + (
            f"{sizes['min']}"
            if sizes["min"] == sizes["max"]
            else f"{sizes['min']} to {sizes['max']}"
        )
    )
    line = f"mean outcome {stats['mean_outcome']:.3f}, success rate {stats['success_rate']:.3f}"
    if stats["pass_hat_k"]:
        line += "; " + ", ".join(f"pass^{k} {v:.3f}" for k, v in stats["pass_hat_k"].items())
    else:
        line += "; pass^k not shown: tasks have different numbers of trajectories"
    print(line)
    turns = stats["turns_per_trajectory"]
    print(
        f"{stats['assistant_turns']} assistant turns, {turns['mean']:.1f} per trajectory "
        f"(at most {turns['max']})"
        + (f", {stats['unlabelled_turns']} without a tier" if stats["unlabelled_turns"] else "")
    )
    if stats["tiers"]:
        width = max(12, *(len(tier) for tier in stats["tiers"]))
        header = ("tier", "turns", "share", "mean reward", "traj.", "success")
        print(f"{header[0]:<{width}} " + "{:>8} {:>6} {:>11} {:>7} {:>7}".format(*header[1:]))
        for tier, row in stats["tiers"].items():
            print(
                f"{tier:<{width}} {row['turns']:>8} {row['turn_share']:>6.1%} "
                f"{row['mean_reward']:>+11.3f} {row['trajectories']:>7} {row['success_rate']:>7.3f}"
            )
    reasons = _stop_reason_labels(stats)
    width = max(12, *(len(reason) for reason, _ in reasons))
    header = ("stop reason", "traj.", "share", "success")
    print(f"{header[0]:<{width}} " + "{:>8} {:>6} {:>7}".format(*header[1:]))
    for reason, row in reasons:
        print(
            f"{reason:<{width}} {row['trajectories']:>8} {row['share']:>6.1%} "
            f"{row['success_rate']:>7.3f}"
        )
    if len(stats["stop_reasons_per_file"]) > 1:
        print("stop reasons per file:")
        for one in stats["stop_reasons_per_file"]:
            rows = ", ".join(
                f"{reason} {row['trajectories']} ({row['share']:.1%}, success "
                f"{row['success_rate']:.3f})"
                for reason, row in _stop_reason_labels(one)
            )
            count = one["trajectories"]
            print(
                f"  {one['file']}: "
                + (f"{count} trajectories; {rows}" if count else "no trajectories")
            )
    return 0


def _repeats_warning(repeats: Mapping[str, Any]) -> str:
    """The warning for trajectories that repeat an earlier one's group and sample
    (``buffer_stats``' ``repeated_samples``). A warning, not a refusal: separate
    runs that wrote the same groups are rollouts too, and nothing is dropped."""
    return (
        f"{repeats['trajectories']} trajectories have the group and sample of an earlier "
        f"one, the first group {repeats['group']!r} sample {repeats['sample']} at "
        f"{repeats['at']} (as at {repeats['first_at']}): the same rollouts read twice (a "
        "buffer and a copy of it, a file holding its lines twice) count twice in every "
        "figure; separate runs' rollouts keep apart in groups of their own (rollouts "
        "collect --group-prefix)"
    )


def _domain_and_tasks(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """The --env domain (--root, --split, --seed) and its --tasks."""
    from turnrl import envs
    from turnrl.collect import select_tasks

    extra = {"seed": args.seed} if args.env.startswith("synthetic:") else {}
    domain = envs.load(args.env, root=args.root, split=args.split, **extra)
    return domain, select_tasks(domain, args.tasks)


def _collect(args: argparse.Namespace) -> int:
    from turnrl import envs
    from turnrl.collect import CollectSummary, collect_rollouts
    from turnrl.exceptions import InvalidInputError

    _check_user_and_device(args, args.device if args.engine == "transformers" else None)
    if args.judge_url and not args.judge_model:
        # No judge runs without a model: the assertions would go unchecked, unsaid.
        raise InvalidInputError(
            "--judge-url is the judge's (--judge-model): give the judge model too, or leave "
            "--judge-url out"
        )
    domain, tasks = _domain_and_tasks(args)

    # One agent for every episode: an OpenAIAgent keeps no conversation and
    # its HTTP client is thread-safe; an EngineAgent batches the episodes'
    # requests into one generate call.
    agent: Any
    if args.engine is None:
        # Per option of a model run here, the --engine values that take it.
        local = {
            "--adapter": (args.adapter, ("transformers", "vllm")),
            "--dtype": (args.dtype, ("transformers",)),
            "--device": (args.device, ("transformers",)),
            "--cache-implementation": (args.cache_implementation, ("transformers",)),
            "--max-model-len": (args.max_model_len, ("vllm",)),
            "--vllm-gpu-memory": (args.vllm_gpu_memory, ("vllm",)),
        }
        given = {option: engines for option, (value, engines) in local.items() if value is not None}
        if given:
            common = [e for e in ("transformers", "vllm") if all(e in v for v in given.values())]
            if common:
                raise InvalidInputError(
                    f"{', '.join(given)} run a model here: add --engine {' or '.join(common)}"
                )
            raise InvalidInputError(
                f"{', '.join(given)} run a model here, and no one engine takes them all: "
                + "; ".join(
                    f"{option} is for --engine {' or '.join(engines)}"
                    for option, engines in given.items()
                )
            )
        agent = envs.OpenAIAgent(
            args.agent_model,
            args.agent_url,
            temperature=args.agent_temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            max_tokens=args.max_tokens,
            # vLLM and SGLang pass these to the chat template.
            extra_body={"chat_template_kwargs": {"enable_thinking": False}}
            if args.no_thinking
            else None,
        )
    else:
        agent = _local_agent(args)

    def make_agent() -> Any:
        return agent

    make_user = _make_user(args)

    judge = envs.LLMJudge(args.judge_model, args.judge_url) if args.judge_model else None
    summary = CollectSummary()
    try:
        collect_rollouts(
            domain,
            make_agent,
            make_user,
            args.out,
            tasks=tasks,
            samples=args.samples,
            tiers=args.tiers,
            max_steps=args.max_steps,
            calls_per_message=args.calls_per_message,
            nl_judge=judge,
            workers=args.workers,
            group_prefix=args.group_prefix,
            max_consecutive_failures=args.max_consecutive_failures or None,
            progress=not args.quiet,
            summary=summary,  # filled in place, so an interrupt still reports it
        )
    except KeyboardInterrupt:
        if summary.finished:
            # Ctrl-C came as the finished buffer was closed: report the run as it ended.
            print("interrupted after the collection ended: nothing was lost", file=sys.stderr)
            return _collect_report(args, summary)
        print(
            f"interrupted: {summary.records} finished rollouts written to {args.out}"
            if summary.records
            else f"interrupted: nothing finished; {args.out} left as it was",
            file=sys.stderr,
        )
        # Those that failed before the interrupt, as at a normal end.
        _print_failures(summary)
        if summary.failures:
            print(_failure_count(summary), file=sys.stderr)
        return 130
    return _collect_report(args, summary)


def _collect_report(args: argparse.Namespace, summary: Any) -> int:
    """What a collection that ended wrote and what failed; the exit code."""
    if summary.records:
        tiers = ", ".join(f"{tier} {n}" for tier, n in summary.tiers.most_common())
        stops = ", ".join(f"{why} {n}" for why, n in summary.stop_reasons.most_common())
        dropped = (
            f"; {summary.dropped_calls} tool calls not run (past --calls-per-message or a transfer)"
            if summary.dropped_calls
            else ""
        )
        turns = f"assistant turns by tier: {tiers}" if tiers else "no assistant turns"
        print(
            f"wrote {summary.records} rollouts to {args.out}: success "
            f"{summary.success_rate:.3f}; stops: {stops}; {turns}" + dropped
        )
        _print_pass_hat_k(summary)
    _print_failures(summary)
    if summary.aborted:
        print(f"stopped early: {summary.aborted}", file=sys.stderr)
    if not summary.records:
        print(f"no episode finished; {args.out} left as it was", file=sys.stderr)
        if args.engine is None and os.path.exists(args.agent_model):
            # Without --engine the model is asked for at --agent-url, by name.
            print(
                f"--agent-model {args.agent_model} is a local path, asked for by name at "
                f"{args.agent_url or 'OPENAI_BASE_URL'}: to run it here, add --engine "
                "transformers (or vllm)",
                file=sys.stderr,
            )
    if summary.failures or summary.aborted:
        print(_failure_count(summary), file=sys.stderr)
        return 1
    return 0


def _print_failures(summary: Any) -> None:
    """Each failed episode: its task, sample and error, on stderr."""
    for task_id, sample, error in summary.failures:
        print(f"failed: task {task_id} sample {sample}: {error}", file=sys.stderr)


def _failure_count(summary: Any) -> str:
    return f"{len(summary.failures)} episodes failed and were not written"


def _print_pass_hat_k(summary: Any) -> None:
    """tau-bench's pass^k at k = 1, 2, 4, ... and the number of episodes per task,
    when every task has that many written episodes."""
    counts = {len(outcomes) for outcomes in summary.task_outcomes.values()}
    if len(counts) > 1:
        print(
            f"pass^k not shown: tasks have from {min(counts)} to {max(counts)} written episodes "
            "(failed episodes are not written; a task listed twice has twice the samples)",
            file=sys.stderr,
        )
        return
    from turnrl.envs._base import pass_hat_ks

    episodes = counts.pop()
    if episodes < 1:
        return
    # pass^1 of one episode per task too: the share of tasks whose outcome is
    # 1, which the success rate (a mean of outcomes) is not when some are partial.
    shown = ", ".join(f"pass^{k} {summary.pass_hat_k(k):.3f}" for k in pass_hat_ks(episodes))
    noun = "episode" if episodes == 1 else "episodes"
    print(f"{shown} ({len(summary.task_outcomes)} tasks x {episodes} {noun})")


# The LoRA ranks vLLM's engine takes as max_lora_rank.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM takes that holds an adapter of ``rank``."""
    from turnrl.exceptions import InvalidInputError

    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise InvalidInputError(f"LoRA rank {rank} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}")


def _local_agent(args: argparse.Namespace) -> Any:
    """An EngineAgent on the --agent-model run here (--engine), with --adapter on it."""
    import json
    from pathlib import Path

    from turnrl.engines import EngineAgent, TransformersEngine, VLLMEngine
    from turnrl.exceptions import InvalidInputError
    from turnrl.train import load_model, run_folder_hint

    if args.agent_url:
        raise InvalidInputError("--agent-url is for a served policy; with --engine leave it out")
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise InvalidInputError(
            f"--adapter {args.adapter}: no adapter_config.json there{run_folder_hint(args.adapter)}"
        )
    template = {"enable_thinking": False} if args.no_thinking else {}
    options = {
        "max_new_tokens": args.max_tokens or 1024,
        "temperature": args.agent_temperature,
        **_sampling(args),
        "chat_template_kwargs": template,
    }
    if args.engine == "vllm":
        if args.dtype is not None or args.device is not None:
            raise InvalidInputError("--dtype and --device are for --engine transformers")
        _check_cache_implementation(args, args.engine)
        rank = 8
        if args.adapter is not None:
            config = json.loads((Path(args.adapter) / "adapter_config.json").read_text())
            ranks = [config.get("r", rank), *(config.get("rank_pattern") or {}).values()]
            rank = max(int(r) for r in ranks)
        engine: Any = VLLMEngine(
            args.agent_model,
            enable_lora=args.adapter is not None,
            max_lora_rank=vllm_lora_rank(rank),
            **options,
            **(
                {}
                if args.vllm_gpu_memory is None
                else {"gpu_memory_utilization": args.vllm_gpu_memory}
            ),
            **({} if args.max_model_len is None else {"max_model_len": args.max_model_len}),
        )
        if args.adapter is not None:
            engine.load_adapter(str(args.adapter))
    else:
        for option, value in (
            ("--vllm-gpu-memory", args.vllm_gpu_memory),
            ("--max-model-len", args.max_model_len),
        ):
            if value is not None:
                raise InvalidInputError(f"{option} is for --engine vllm")
        _check_cache_implementation(args, args.engine)
        model, tokenizer = load_model(
            args.agent_model,
            dtype=args.dtype or "bfloat16",
            device=args.device,
            adapter=args.adapter,
        )
        engine = TransformersEngine(
            model, tokenizer, cache_implementation=args.cache_implementation, **options
        )
    return EngineAgent(engine)


def _check_user_and_device(args: argparse.Namespace, device: str | None) -> None:
    """Refuse a missing --user-model and a --device cuda that torch cannot see
    before any model loads (loading a large one takes minutes)."""
    from turnrl.exceptions import InvalidInputError

    if getattr(args, "user", None) == "llm" and not args.user_model:
        raise InvalidInputError("--user llm needs --user-model (or use --user scripted)")
    if device is not None and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InvalidInputError(
                f"--device {device}: torch sees no CUDA device on this machine; use --device cpu"
            )


def _check_cache_implementation(args: argparse.Namespace, engine: str) -> None:
    """Refuse --cache-implementation for an engine other than transformers, and
    an offloaded KV cache (transformers moves it off a CUDA device) where the
    model will not be on CUDA, before any model loads."""
    from turnrl.exceptions import InvalidInputError

    name = args.cache_implementation
    if name is None:
        return
    if engine != "transformers":
        raise InvalidInputError("--cache-implementation is for --engine transformers")
    if "offloaded" not in name:
        return
    if args.device is None:
        import torch

        on_cuda = torch.cuda.is_available()  # the default device
    else:
        on_cuda = args.device.startswith("cuda")
    if not on_cuda:
        raise InvalidInputError(
            f"--cache-implementation {name} needs --device cuda (it offloads the KV cache "
            "from the GPU)"
        )


def _make_user(args: argparse.Namespace) -> Any:
    """The simulated user factory the --user options ask for. An LLM user is
    shown each task's benchmark prompt (tau-bench's layout, or tau2's
    guidelines and scenario), as :class:`turnrl.envs.LLMUser` does by default."""
    from turnrl import envs
    from turnrl.exceptions import InvalidInputError

    if args.user == "scripted":
        return envs.ScriptedUser
    if not args.user_model:
        raise InvalidInputError("--user llm needs --user-model (or use --user scripted)")

    def make_user() -> envs.LLMUser:
        return envs.LLMUser(args.user_model, args.user_url)

    return make_user


def _merge_adapter(args: argparse.Namespace) -> int:
    from turnrl.train import merge_adapter

    _check_user_and_device(args, args.device)
    out = merge_adapter(
        args.adapter,
        args.out,
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}: the base model with the adapter folded into its weights")
    return 0


def _train(args: argparse.Namespace) -> int:
    from turnrl.exceptions import InvalidInputError
    from turnrl.train import _check_mini_batches

    # "none": the option's default, given to switch off what a --config file set.
    for name in _CHOICES_OFF_AS_NONE:
        if getattr(args, name) == "none":
            setattr(args, name, None)
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        _note_unused_estimator_options(args, "train")
        _note_unused_loss_options(args)

    evaluation_options = {
        "--eval-split": args.eval_split,
        "--eval-tasks": args.eval_tasks,
        "--eval-samples": args.eval_samples,
        "--eval-temperature": args.eval_temperature,
        "--eval-before": args.eval_before or None,
    }
    given = [option for option, value in evaluation_options.items() if value is not None]
    if given and args.eval_every is None:
        raise InvalidInputError(f"{', '.join(given)} set up evaluation: add --eval-every N")
    wandb_options = {"--run-name": args.run_name, "--wandb-project": args.wandb_project}
    given = [option for option, value in wandb_options.items() if value is not None]
    if given and "wandb" not in args.report_to:
        raise InvalidInputError(f"{', '.join(given)} name the W&B run: add --report-to wandb")
    if args.save_total_limit is not None and args.save_every is None:
        raise InvalidInputError(
            "--save-total-limit keeps --save-every's snapshots: add --save-every N"
        )
    if args.rollout_correction is not None and args.engine == "transformers":
        raise InvalidInputError(
            "--rollout-correction corrects for vLLM's sampling: add --engine vllm or server "
            "(the transformers engine samples from the trained model itself)"
        )
    # The sampling options set to something other than off (the whole softmax),
    # and what they make of it.
    truncating = [
        f"{option} {value}"
        for (option, value), off in zip(
            _sampling_options(args).items(), _sampling_options(None).values(), strict=True
        )
        if value != off
    ]
    # --top-p, --top-k and --min-p keep some tokens and renormalise; the
    # repetition penalty reshapes the logits.
    penalised = [t for t in truncating if t.startswith("--repetition-penalty ")]
    reshaped = " and ".join(
        (["truncated, renormalised"] if len(truncating) > len(penalised) else [])
        + (["penalised"] if penalised else [])
    )
    if args.rollout_correction is not None and truncating:
        raise InvalidInputError(
            "--rollout-correction weighs each token by the trainer's softmax over the "
            f"sampler's, and under {' and '.join(truncating)} the sampler draws from a "
            f"{reshaped} distribution whose log-probs are not asked for: leave "
            f"{' and '.join(t.split()[0] for t in truncating)} out, or --rollout-correction"
        )
    if args.engine != "server":
        given = [
            option
            for option, value in (
                ("--agent-url", args.agent_url),
                ("--served-model-name", args.served_model_name),
            )
            if value is not None
        ]
        if given:
            raise InvalidInputError(f"{', '.join(given)}: for --engine server")
    if args.max_model_len is not None and args.engine == "transformers":
        raise InvalidInputError("--max-model-len: for --engine vllm or server")
    if not args.rollout_correction_cap >= 1:
        raise InvalidInputError(
            f"--rollout-correction-cap must be at least 1, got {args.rollout_correction_cap}"
        )
    if args.off_policy_mask is not None and args.ppo_epochs == 1 and args.mini_batches == 1:
        # Without sampler log-probs the mask compares the policy with itself
        # (after a second epoch's or mini-batch's first update it has moved).
        no_sampler, remedy = None, ""
        if args.engine == "transformers":
            no_sampler = "the transformers engine samples from the trained model itself"
            remedy = "add --engine vllm or server"
        elif truncating:
            no_sampler = (
                f"under {' and '.join(truncating)} no engine keeps the sampler's log-probs "
                f"(its distribution is {reshaped})"
            )
            remedy = f"leave {' and '.join(t.split()[0] for t in truncating)} out"
        elif args.engine == "server" and args.temperature != 1:
            # A served vLLM's default raw log-probs are before temperature.
            no_sampler = (
                f"at --temperature {args.temperature} the server engine keeps no sampler "
                "log-probs (a served vLLM's are taken before temperature)"
            )
            remedy = "sample at --temperature 1"
        if no_sampler is not None:
            raise InvalidInputError(
                "--off-policy-mask drops the turns the policy has moved away from since they "
                f"were sampled, and {no_sampler}, so with one --ppo-epochs and one "
                "--mini-batches the policy is compared with itself: add --ppo-epochs 2 or "
                f"more (or --mini-batches 2 or more), or {remedy}"
            )
    if args.kl_correction and not args.beta > 0:
        raise InvalidInputError(
            "--kl-correction weights the KL term by pi / pi_old, and there is none without "
            "--beta: add --beta (above 0)"
        )
    if args.policy_loss == "cispo" and args.dual_clip is not None:
        raise InvalidInputError(
            "--dual-clip caps PPO's loss of a negative advantage, and --policy-loss cispo "
            "clips its weight on both sides whatever the sign: leave --dual-clip out"
        )
    if args.policy_loss == "sapo" and args.dual_clip is not None:
        raise InvalidInputError(
            "--dual-clip caps PPO's loss of a negative advantage, and --policy-loss sapo's "
            "gate already bounds it: leave --dual-clip out"
        )
    sapo_taus = [
        option
        for option, value in (
            ("--sapo-tau-pos", args.sapo_tau_pos),
            ("--sapo-tau-neg", args.sapo_tau_neg),
        )
        if value is not None
    ]
    if sapo_taus and args.policy_loss != "sapo":
        raise InvalidInputError(
            f"{', '.join(sapo_taus)}: SAPO's temperatures, for --policy-loss sapo alone "
            f"(this run's is {args.policy_loss})"
        )
    if args.vllm_sleep and args.engine != "vllm":
        raise InvalidInputError("--vllm-sleep puts vLLM to sleep during updates: add --engine vllm")
    if args.max_sampling_rounds is not None and args.filter_groups is None:
        raise InvalidInputError(
            "--max-sampling-rounds limits the rounds --filter-groups samples, and no group is "
            "filtered without it: add --filter-groups outcome or advantage"
        )
    if args.filter_groups == "outcome" and args.group_size < 2:
        raise InvalidInputError(
            "--filter-groups outcome keeps the groups whose episodes' outcomes differ, and "
            f"--group-size {args.group_size} gives each group one episode: use --group-size 2 "
            "or more"
        )
    if args.min_lr_ratio and args.lr_schedule == "constant":
        raise InvalidInputError(
            "--min-lr-ratio is the floor a decaying schedule falls to, and --lr-schedule "
            "constant does not fall: add --lr-schedule linear or cosine"
        )
    if args.truncation != "right" and args.max_length is None:
        raise InvalidInputError(
            f"--truncation {args.truncation} says what --max-length does to a longer row, "
            "and no row is cut without it: add --max-length N"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tasks_per_step < world:
        # train_loop refuses it too, but only once every rank has loaded the model.
        raise InvalidInputError(
            f"--tasks-per-step {args.tasks_per_step} gives some of torchrun's {world} ranks "
            "no task, and each rank collects whole groups: give --tasks-per-step "
            f"{world} or more, or start fewer ranks"
        )
    _check_mini_batches(
        args.mini_batches,
        args.tasks_per_step,
        args.group_size,
        world,
        spell=lambda name, value: f"--{name.replace('_', '-')} {value}",
    )
    if not args.resume:
        # A resumed run's schedule also spans the steps done, known from its checkpoint.
        _check_schedule_decays(args)
    _check_cache_implementation(args, args.engine)
    _check_user_and_device(args, args.device)
    rank, device, started_group = _start_data_parallel(args)
    try:
        return _train_on_rank(args, rank, device)
    finally:
        if started_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def metrics_line(step: int, stats: Mapping[str, float]) -> str:
    """One step's line of ``metrics.jsonl``: strict JSON, a statistic that was not
    measured (NaN: no row ran) written as null."""
    import json

    from turnrl.calibration import _finite_or_none

    return json.dumps({"step": step, **_finite_or_none(dict(stats))}, allow_nan=False)


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options as a JSON-safe dict: the config a tracker gets for the run."""

    def json_safe(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):  # JSON has no NaN or infinity
            return value if math.isfinite(value) else str(value)
        if isinstance(value, (list, tuple)):
            return [json_safe(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): json_safe(v) for k, v in value.items()}
        return str(value)

    # "run" is the subcommand's function, not a setting.
    return {key: json_safe(value) for key, value in vars(args).items() if key != "run"}


def _start_data_parallel(args: argparse.Namespace) -> tuple[int, str | None, bool]:
    """Join torchrun's process group when there is one: (rank, device, whether we started it).

    NCCL on the rank's GPU (``cuda:LOCAL_RANK``), or gloo for ``--device cpu``
    and machines without CUDA.
    """
    import datetime
    import os

    from turnrl.exceptions import InvalidInputError

    device = args.device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, device, False
    if args.engine == "vllm":
        raise InvalidInputError(
            "--engine vllm is not supported under torchrun yet (each rank would need its own "
            "vLLM engine on its own GPU); use --engine transformers, or one process"
        )
    if device not in (None, "cuda", "cpu"):
        raise InvalidInputError(
            f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; "
            "pass --device cuda or cpu"
        )
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
    if dist.is_initialized():
        return dist.get_rank(), device, False
    # Ranks meet after collecting their rollouts, which can take one far longer
    # than another: the default (10 minutes for NCCL) would abort the job.
    timeout = datetime.timedelta(minutes=args.dist_timeout)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return dist.get_rank(), device, True


def _server_engine(
    args: argparse.Namespace,
    tokenizer: Any,
    template: dict[str, Any],
    adapter: Any,
    resume: Any,
    rank: int,
    end_token_ids: Any = None,
) -> tuple[Any, Any]:
    """``--engine server``: the policy server's engine, with each saved adapter
    registered there by rank 0 (the other ranks switch to it after the step's
    closing collective), under names no other launch uses."""
    import secrets

    import torch

    from turnrl.engines import ServerEngine

    launch = [secrets.token_hex(3)]
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.broadcast_object_list(launch, src=0)
    engine = ServerEngine(
        args.served_model_name or args.model,
        tokenizer,
        args.agent_url,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        **_sampling(args),
        chat_template_kwargs=template,
        adapter_prefix=f"turnrl-{launch[0]}",
        max_model_len=args.max_model_len,
        end_token_ids=end_token_ids,
    )
    # The server reads the adapter's files itself, so it gets an absolute path.
    saved = str(adapter.resolve())
    if resume is not None:
        engine.load_adapter(saved, register=rank == 0)
        if distributed:
            torch.distributed.barrier()  # no rank asks for it before it is there

    def after_update() -> None:
        engine.load_adapter(saved, register=rank == 0)

    return engine, after_update


def _check_schedule_decays(
    args: argparse.Namespace, updates_done: int = 0, done_how: str = ""
) -> None:
    """Refuses a decaying --lr-schedule with no optimizer step after --warmup-steps
    over this run's steps and ``updates_done`` (the optimizer steps a resumed
    run's checkpoint planned, taken or skipped; ``done_how`` says how they
    were counted), naming the options."""
    from turnrl.exceptions import InvalidInputError

    updates = updates_done + args.steps * args.ppo_epochs * args.mini_batches
    if args.lr_schedule == "constant" or updates > args.warmup_steps:
        return
    # Named when not 1, so that a run without mini-batches reads as it did.
    parts = f" x --mini-batches {args.mini_batches}" if args.mini_batches != 1 else ""
    done = f"{updates_done} done {done_how}, and " if updates_done else ""
    raise InvalidInputError(
        f"--lr-schedule {args.lr_schedule} decays the rate after --warmup-steps "
        f"{args.warmup_steps}, and the run takes {updates} optimizer steps ({done}--steps "
        f"{args.steps} x --ppo-epochs {args.ppo_epochs}{parts}): give fewer --warmup-steps or "
        "more --steps"
    )


def _train_on_rank(args: argparse.Namespace, rank: int, device: str | None) -> int:
    import json
    import os
    from pathlib import Path

    import torch

    from turnrl.collect import episode_tier_rewards
    from turnrl.engines import EngineAgent, TransformersEngine
    from turnrl.exceptions import InvalidInputError
    from turnrl.loggers import close_loggers, make_loggers, require_loggers
    from turnrl.train import (
        STATE_FILE,
        GTPOConfig,
        GTPOTrainer,
        _loss_settings,
        _raise_together,
        _seed_host_generators,
        evaluation_only,
        load_policy,
        lr_schedule,
        plot_history,
        recover_adapter,
        task_draw,
        train_loop,
    )

    if rank == 0:  # a missing tracker package fails now, not after the model loads
        require_loggers(args.report_to)
    if args.tiers is not None and args.calibrate_every is None:
        episode_tier_rewards(args.tiers)  # so does a table without a reward for each tier
    domain, tasks = _domain_and_tasks(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter, metrics = out / "adapter", out / "metrics.jsonl"
    if args.resume and rank == 0:
        recover_adapter(adapter)  # a run killed while saving left it aside
        recover_adapter(out / "best")  # with or without --eval-every in this run
        _drop_cut_line(metrics)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # the other ranks wait for the recovery
    resume = adapter if args.resume and (adapter / "adapter_config.json").exists() else None
    # Stopped in its first step, a run has no adapter and at most the evaluation
    # before it; OUT/best and the snapshots come after a step's checkpoint.
    started = [row for row in _metrics_rows(metrics) if row.get("step") != -1]
    snapshots_there = [
        name
        for name, there in (
            ("best", (out / "best").exists()),
            ("checkpoints", any((out / "checkpoints").glob("step-*"))),
        )
        if there
    ]
    if args.resume and resume is None and (started or snapshots_there):
        raise InvalidInputError(
            f"--resume: {out} has {'metrics' if started else ' and '.join(snapshots_there)} "
            f"but no adapter at {adapter} to continue from"
        )
    held = [
        *([metrics.name] if metrics.exists() else []),
        *([adapter.name] if (adapter / "adapter_config.json").exists() else []),
        *snapshots_there,
    ]
    if not args.resume and held:
        # A second run's lines, snapshots and best would mix with the first's
        # (its first evaluation would replace the best of another run).
        raise InvalidInputError(
            f"{out} holds a run already ({', '.join(held)}): continue it with "
            "--resume, or give another --out"
        )
    # As TRL's set_seed: a fresh adapter's weights, then the sampling, from
    # --seed (each rank its own stream; rank 0's adapter is every rank's), and
    # random and numpy's global generator, which environments, user
    # simulators and reward code may draw from.
    torch.manual_seed(args.seed + rank)
    _seed_host_generators(args.seed + rank)
    model, tokenizer = load_policy(
        args.model,
        dtype=args.dtype,
        device=device,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        target_modules=args.lora_targets.split(",")
        if "," in args.lora_targets
        else args.lora_targets,
        adapter=resume,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    # A resumed adapter keeps the LoRA shape it was saved with, whatever --lora-rank says.
    lora = model.peft_config["default"]
    lora_rank = max(int(r) for r in [lora.r, *(lora.rank_pattern or {}).values()])
    if resume is not None and rank == 0 and lora.r != args.lora_rank:
        print(
            f"--resume: the adapter keeps the LoRA rank it was saved with ({lora.r}); "
            f"--lora-rank {args.lora_rank} is not used",
            file=sys.stderr,
        )
    template = {"enable_thinking": False} if args.no_thinking else {}
    after_update = before_update = None
    if args.engine == "vllm":
        from turnrl.engines import VLLMEngine

        engine: Any = VLLMEngine(
            args.model,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            **_sampling(args),
            chat_template_kwargs=template,
            max_lora_rank=vllm_lora_rank(lora_rank),
            gpu_memory_utilization=args.vllm_gpu_memory,
            sleep_mode=args.vllm_sleep,
            **({} if args.max_model_len is None else {"max_model_len": args.max_model_len}),
        )
        if resume is not None:
            engine.load_adapter(str(adapter))
        if args.vllm_sleep:
            before_update = engine.sleep

        def after_update() -> None:
            engine.load_adapter(str(adapter))

    elif args.engine == "server":
        # The end tokens the server stops on besides eos: the policy's
        # generation config's, which vLLM reads from the same model.
        ends = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        engine, after_update = _server_engine(
            args, tokenizer, template, adapter, resume, rank, ends
        )
    else:
        engine = TransformersEngine(
            model,
            tokenizer,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            **_sampling(args),
            chat_template_kwargs=template,
            cache_implementation=args.cache_implementation,
        )
    agent = EngineAgent(engine)
    evaluation = (
        _evaluation(args, domain, tasks, engine, out, rank) if args.eval_every is not None else None
    )
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = GTPOTrainer(
        model,
        torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay),
        GTPOConfig(
            micro_batch_size=args.micro_batch_size,
            micro_batch_tokens=args.micro_batch_tokens,
            skip_zero_advantage=args.skip_zero_advantage,
            ppo_epochs=args.ppo_epochs,
            mini_batches=args.mini_batches,
            policy_loss=args.policy_loss,
            # None: not given, the field's default (which a resume compares).
            **{
                field: value
                for field, value in (
                    ("sapo_tau_pos", args.sapo_tau_pos),
                    ("sapo_tau_neg", args.sapo_tau_neg),
                )
                if value is not None
            },
            eps_low=args.eps_low,
            eps_high=args.eps_high,
            beta=args.beta,
            kl_estimator=args.kl_estimator,
            kl_correction=args.kl_correction,
            off_policy_mask=args.off_policy_mask,
            top_entropy_quantile=args.top_entropy_quantile,
            entropy_coef=args.entropy_coef,
            dual_clip=args.dual_clip,
            max_grad_norm=args.max_grad_norm,
            temperature=args.temperature,
            agg=args.agg,
            importance_level=args.importance_level,
            max_len=args.max_length,  # dr_grpo's constant length, when there is one
            rollout_correction=args.rollout_correction,
            rollout_correction_cap=args.rollout_correction_cap,
        ),
    )
    first_step = 0
    state: dict[str, Any] = {}
    if resume is not None:
        # The adapter knows the step it was saved after; the metrics file may
        # lack that step's line if a run was killed just after the save.
        try:
            state = json.loads((adapter / STATE_FILE).read_text(encoding="utf-8"))
            first_step = int(state["step"]) + 1
        except (OSError, ValueError, KeyError, TypeError):
            raise InvalidInputError(
                f"--resume: {adapter / STATE_FILE} is missing or unreadable"
            ) from None
    saved_estimator = state.get("estimator")
    if isinstance(saved_estimator, Mapping) and rank == 0:
        now = {"estimator": args.estimator, **_estimator_params(args)}
        _note_setting_changes(
            "this run's estimator settings replace the checkpoint's", saved_estimator, now
        )
    saved_loss = state.get("loss")  # absent from an older turnrl's checkpoint
    if isinstance(saved_loss, Mapping) and rank == 0:
        # A setting the checkpoint lacks came after it (--kl-estimator): it
        # trained at that setting's default.
        saved = {**_loss_settings(GTPOConfig()), **saved_loss}
        _note_setting_changes(
            "this run's loss settings replace the checkpoint's",
            _loss_options(saved),
            _loss_options(_loss_settings(trainer.config)),
        )
    saved_draw = state.get("task_draw")
    if isinstance(saved_draw, Mapping) and rank == 0:
        pool = [domain.task(t) for t in tasks]
        _note_setting_changes(
            "this run draws its tasks otherwise than the checkpoint's, so its steps are not "
            "given the tasks an unbroken run's would",
            _task_draw_options(saved_draw),
            _task_draw_options(task_draw(pool, args.tasks_per_step, args.seed)),
        )
    saved_sampling = state.get("sampling")  # absent from an older turnrl's checkpoint
    if isinstance(saved_sampling, Mapping) and rank == 0:
        _note_setting_changes(
            "this run's sampling settings replace the checkpoint's",
            {**_sampling_options(None), **saved_sampling},
            _sampling_options(args),
        )
    saved_schedule = state.get("schedule")  # absent from an older turnrl's checkpoint
    if isinstance(saved_schedule, Mapping) and rank == 0:
        # A schedule left off a resumed command (its --lr-schedule cosine,
        # say) would otherwise go on as constant without a word.
        _note_setting_changes(
            "this run's learning-rate schedule replaces the checkpoint's",
            {**_schedule_options(None), **saved_schedule},
            _schedule_options(args),
        )
    if resume is not None and rank == 0:
        now = {"filter_groups": args.filter_groups, "max_sampling_rounds": args.max_sampling_rounds}
        _note_setting_changes(
            "this run filters its groups otherwise than the checkpoint's, so its steps are not "
            "given the groups an unbroken run's would",
            _filtering_options(state.get("filter_groups")),
            _filtering_options(now),
        )
    if evaluation is not None and resume is not None:
        evaluation = _resumed_evaluation(evaluation, state, first_step, metrics, rank)
    elif evaluation is not None and args.resume and evaluation.before_training:
        import dataclasses

        # A fresh adapter is the base model (LoRA's B starts at 0), as it was then.
        if any("eval/success_rate" in row for row in _metrics_rows(metrics)):
            if rank == 0:
                print(
                    f"--eval-before: the starting policy was evaluated already ({metrics}); "
                    "it is not evaluated again",
                    file=sys.stderr,
                )
            evaluation = dataclasses.replace(evaluation, before_training=False)
    tiers: Any = args.tiers or "naive"
    if args.calibrate_every is not None:
        tiers = _online_calibrator(args, state, adapter / STATE_FILE, resume is not None, rank)
    elif "calibrator" in state and rank == 0:
        print(
            "--resume: the checkpoint was calibrating its tier rewards; without "
            f"--calibrate-every this run uses --tiers {tiers} as they are",
            file=sys.stderr,
        )
    # The schedule runs to the last step of this run (a resumed run's included),
    # counted in planned optimizer steps, taken or skipped for lack of signal.
    # The checkpoint counts those of the steps done ("planned_updates"), each
    # at the --ppo-epochs x --mini-batches it ran with, so a resume with fewer
    # does not find its schedule run out. An older checkpoint without the
    # count is taken to have planned its last settings' each (its epochs, not
    # kept either, taken as this run's; its mini-batches, from before there
    # were any, as 1): right unless an earlier resume changed them.
    updates_done = state.get("planned_updates")
    if isinstance(updates_done, bool) or not isinstance(updates_done, int) or updates_done < 0:
        saved_epochs = saved_loss.get("ppo_epochs") if isinstance(saved_loss, Mapping) else None
        if isinstance(saved_epochs, bool) or not isinstance(saved_epochs, int) or saved_epochs < 1:
            saved_epochs = args.ppo_epochs
        saved_parts = saved_loss.get("mini_batches") if isinstance(saved_loss, Mapping) else None
        if isinstance(saved_parts, bool) or not isinstance(saved_parts, int) or saved_parts < 1:
            saved_parts = 1
        updates_done = first_step * saved_epochs * saved_parts
        parts = f" x --mini-batches {saved_parts}" if saved_parts != 1 else ""
        done_how = f"at the checkpoint's --ppo-epochs {saved_epochs}{parts}"
    else:
        done_how = "as the checkpoint counts them"
    updates = updates_done + args.steps * args.ppo_epochs * args.mini_batches
    # What _train refuses for a new run before the model loads, for a
    # --resume'd one (or a --resume with nothing to resume yet).
    _check_schedule_decays(args, updates_done, done_how)
    trainer.scheduler = lr_schedule(
        trainer.optimizer,
        args.lr_schedule,
        warmup_steps=args.warmup_steps,
        total_steps=updates,
        min_lr_ratio=args.min_lr_ratio,
    )
    if resume is not None:
        if not trainer.load_optimizer(adapter):
            # The schedule goes on from where the steps done put it, not from
            # its warmup: every planned update steps it, those skipped for lack
            # of signal included, so the steps done say exactly where it stands.
            trainer.scheduler = lr_schedule(
                trainer.optimizer,
                args.lr_schedule,
                warmup_steps=args.warmup_steps,
                total_steps=updates,
                start=updates_done,
                min_lr_ratio=args.min_lr_ratio,
            )
            if rank == 0:
                print(
                    f"--resume: {adapter} has no optimizer state; AdamW starts its moments "
                    f"afresh, and the learning-rate schedule goes on from step {first_step}",
                    file=sys.stderr,
                )
        elif trainer.resume_changes and rank == 0:
            print(
                "--resume: this run's settings replace the checkpoint's: "
                + "; ".join(trainer.resume_changes),
                file=sys.stderr,
            )

    snapshots: _Snapshots | None = None
    refused: Exception | None = None
    try:
        if rank == 0 and (args.save_every is not None or evaluation is not None):
            snapshots = _Snapshots(
                out,
                every=args.save_every,
                total_limit=args.save_total_limit,
                keep_best=evaluation is not None,
                first_step=first_step,
                last_step=first_step + args.steps - 1,
                resumed=resume is not None,
            )
        if resume is not None:
            # Last: loading the policy and the rest drew from the generators --seed seeded.
            _resume_generators(adapter, rank, args.seed)
    except Exception as e:  # an unreadable best.json or RNG state: every rank stops
        refused = e
    _raise_together(refused, trainer._device())
    make_user = _make_user(args)
    # Made here, after the checks above, so that a refused run leaves no
    # tracker run behind.
    loggers = (
        make_loggers(
            args.report_to,
            out,
            run_config(args),
            run_name=args.run_name or out.resolve().name,
            project=args.wandb_project or os.environ.get("WANDB_PROJECT") or "turnrl",
            resume=args.resume,
        )
        if rank == 0  # every rank has the same figures
        else []
    )

    saved_stats = state.get("stats")
    if rank == 0 and isinstance(saved_stats, Mapping):
        # A run stopped between the save and the step's line: the line is in the checkpoint.
        saved = first_step - 1
        rows = _metrics_rows(metrics)
        if not any(row.get("step") == saved and not evaluation_only(row) for row in rows):
            print(
                f"--resume: the line of step {saved} is missing from {metrics} (the run stopped "
                f"just after saving it); it is written from {adapter / STATE_FILE}",
                file=sys.stderr,
            )
            with metrics.open("a") as f:
                f.write(metrics_line(saved, saved_stats) + "\n")
            for logger in loggers:
                logger.log(saved, saved_stats)

    def on_step(step: int, stats: dict[str, float]) -> None:
        if rank != 0:
            return
        evaluated = evaluation_only(stats)
        # An evaluation's line is written after OUT/best is updated: a run
        # stopped in between leaves no line, and a resumed run evaluates again.
        if snapshots is not None and evaluated:
            snapshots.after_evaluation(step, stats)
        with metrics.open("a") as f:
            f.write(metrics_line(step, stats) + "\n")
        for logger in loggers:
            logger.log(step, stats)
        if snapshots is not None and not evaluated:
            snapshots.after_step(step)

    failed = True
    try:
        history = train_loop(
            trainer,
            domain,
            lambda: agent,
            make_user,
            tokenizer,
            tasks=tasks,
            steps=args.steps,
            tasks_per_step=args.tasks_per_step,
            group_size=args.group_size,
            tiers=tiers,
            estimator=args.estimator,
            estimator_params=_estimator_params(args),
            max_length=args.max_length,
            chat_template_kwargs=template,
            workers=args.workers,
            buffer_dir=out / "rollouts",
            checkpoint=adapter,
            after_update=after_update,
            before_update=before_update,
            on_step=on_step,
            seed=args.seed,
            first_step=first_step,
            pack=args.pack,
            truncation=args.truncation,
            mask_truncated=args.mask_truncated,
            calls_per_message=args.calls_per_message,
            max_steps=args.max_steps,
            evaluation=evaluation,
            filter_groups=args.filter_groups,
            max_sampling_rounds=args.max_sampling_rounds,
            sampling=_sampling_options(args),
            schedule=_schedule_options(args),
            updates_done=updates_done,
            progress=not args.quiet,
        )
        failed = False
    finally:
        close_loggers(loggers, failed=failed)
    if rank != 0:
        return 0
    everything = _metrics_rows(metrics)
    if args.plot:
        plot_history(everything, out / "metrics.png")
    last = history[-1]
    print(
        f"trained {len(history)} steps: last success {last['success_rate']:.3f}, loss "
        f"{last['loss']:.4f}; adapter in {adapter}, metrics in {metrics}"
        + (f", plot in {out / 'metrics.png'}" if args.plot else "")
    )
    evaluated = [line for line in everything if "eval/success_rate" in line]
    if evaluation is not None and evaluated:
        latest = evaluated[-1]
        figures = [f"success {_figure(latest['eval/success_rate'])}"] + [
            f"{key.removeprefix('eval/')} {_figure(value)}"
            for key, value in latest.items()
            if key.startswith("eval/pass^") and key != "eval/pass^1"
        ]
        not_run = latest.get("eval/failed_episodes") or 0
        print(
            f"evaluation after step {latest['step']} ({int(latest['eval/episodes'] or 0)} "
            f"episodes{f', {int(not_run)} failed to run' if not_run else ''}): "
            + ", ".join(figures)
            + f"; episodes in {out / 'eval'}"
        )
    if snapshots is not None:
        for line in snapshots.report():
            print(line)
    if not isinstance(tiers, str):
        held = (
            f", {tiers.held} held back: no trajectory in the window succeeded, or every one did"
            if tiers.held
            else ""
        )
        print(
            f"tier rewards after {tiers.steps} calibrated steps ({len(tiers.reports)} "
            f"re-derived in this run{held}): "
            + ", ".join(f"{tier} {reward:+.3f}" for tier, reward in tiers.rewards.items())
        )
    return 0


BEST_FILE = "best.json"


class _Snapshots:
    """``turnrl train``'s copies of OUT/adapter, made by rank 0 alone.

    With ``every``: OUT/checkpoints/step-S after every step S with
    ``(S + 1) % every == 0`` and after the run's last, the ``total_limit``
    newest kept. With ``keep_best``: OUT/best, the adapter whose evaluation
    had the highest ``eval/success_rate`` so far (the earlier one on a tie;
    an evaluation with no figure never), with the step and its ``eval/``
    figures in OUT/best/best.json. Copies leave out the optimizer's state
    (:func:`turnrl.train.snapshot_adapter`). OUT/best lies outside
    OUT/checkpoints, so ``total_limit`` never removes it.

    A resumed run goes on from the saved best, and its evaluation before
    training (of the adapter it resumed from) competes too; a new run's
    does not (its starting adapter was never saved) and its best starts
    over.
    """

    def __init__(
        self,
        out: Path,
        *,
        every: int | None,
        total_limit: int | None,
        keep_best: bool,
        first_step: int,
        last_step: int,
        resumed: bool,
    ) -> None:
        import json

        from turnrl.exceptions import InvalidInputError
        from turnrl.train import recover_adapter

        self.adapter, self.folder, self.best = out / "adapter", out / "checkpoints", out / "best"
        self.every, self.total_limit, self.keep_best = every, total_limit, keep_best
        self.first_step, self.last_step, self.resumed = first_step, last_step, resumed
        self.best_step: int | None = None
        self.best_success = -math.inf
        self._clear_leftovers()
        if keep_best and resumed:
            recover_adapter(self.best)  # a run killed while replacing it left it aside
            if self.best.exists():
                where = self.best / BEST_FILE
                try:
                    saved = json.loads(where.read_text(encoding="utf-8"))
                    self.best_step = int(saved["step"])
                    self.best_success = float(saved["eval/success_rate"])
                except (OSError, ValueError, KeyError, TypeError):
                    raise InvalidInputError(
                        f"--resume: {where} is missing or unreadable (move {self.best} away "
                        "to start the best over)"
                    ) from None
        resumed_step = first_step - 1
        if resumed and every is not None and first_step % every == 0:
            # The snapshot a killed run may not have made after its last save.
            if not (self.folder / f"step-{resumed_step}").exists():
                self._snapshot(resumed_step)

    def after_step(self, step: int) -> None:
        """Snapshot OUT/adapter after ``step`` when one is due."""
        due = self.every is not None and ((step + 1) % self.every == 0 or step == self.last_step)
        if step >= self.first_step and due:
            self._snapshot(step)

    def after_evaluation(self, step: int, stats: Mapping[str, float]) -> None:
        """Keep OUT/adapter as the best when the evaluation after ``step`` beats it."""
        from turnrl.train import snapshot_adapter

        success = stats.get("eval/success_rate")
        # OUT/adapter holds the evaluated policy after a step of this run, and
        # before the first step of a resumed one.
        saved = step >= self.first_step or self.resumed
        if (
            self.keep_best
            and saved
            and success is not None
            and math.isfinite(success)
            # An evaluation with episodes that failed to run scored the others only.
            and not stats.get("eval/failed_episodes")
            and success > self.best_success
        ):
            figures = {k: v for k, v in stats.items() if k.startswith("eval/")}
            snapshot_adapter(
                self.adapter, self.best, files={BEST_FILE: metrics_line(step, figures) + "\n"}
            )
            self.best_step, self.best_success = step, float(success)

    def report(self) -> list[str]:
        """Where the snapshots and the best adapter are, for the end of the run."""
        lines = []
        if self.every is not None:
            steps = ", ".join(f"step-{s}" for s in sorted(self._steps()))
            lines.append(f"snapshots in {self.folder}: {steps or 'none'}")
        if self.keep_best and self.best_step is not None:
            lines.append(
                f"best adapter in {self.best}: step {self.best_step}, eval success "
                f"{self.best_success:.3f}"
            )
        return lines

    def _snapshot(self, step: int) -> None:
        import os
        import shutil
        import uuid

        from turnrl.train import snapshot_adapter

        snapshot_adapter(self.adapter, self.folder / f"step-{step}")
        if self.total_limit is None:
            return
        # Later steps than this one are an earlier run's, left in a folder
        # reused without --resume: not this run's to count or remove.
        older = sorted(s for s in self._steps() if s <= step)[: -self.total_limit]
        for old in older:
            path = self.folder / f"step-{old}"
            # Renamed away first: a removal cut short leaves no partial
            # snapshot under a snapshot's name.
            doomed = path.with_name(f".{path.name}.removed-{uuid.uuid4().hex[:6]}")
            os.replace(path, doomed)
            shutil.rmtree(doomed)

    def _steps(self) -> list[int]:
        """The steps of the snapshots in OUT/checkpoints."""
        import re

        if not self.folder.is_dir():
            return []
        found = (re.fullmatch(r"step-(\d+)", p.name) for p in self.folder.iterdir())
        return [int(m[1]) for m in found if m is not None]

    def _clear_leftovers(self) -> None:
        """Put back snapshots a killed run had moved aside, and remove its partial copies."""
        import shutil

        from turnrl.train import recover_adapter

        if not self.folder.is_dir():
            return
        for aside in self.folder.glob(".step-*.old-*"):
            recover_adapter(self.folder / aside.name[1:].split(".old-")[0])
        for leftover in self.folder.glob(".step-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _figure(value: float | None) -> str:
    """A metrics.jsonl figure for people: 3 decimals, or "n/a" where it was not measured."""
    return "n/a" if value is None else f"{value:.3f}"


def _evaluation(
    args: argparse.Namespace, domain: Any, tasks: Sequence[Any], engine: Any, out: Any, rank: int
) -> Evaluation:
    """``turnrl train``'s held-out evaluation: --eval-split's --eval-tasks, run by
    the policy being trained (on ``tasks``) on an engine sampling at --eval-temperature."""
    from turnrl import envs
    from turnrl.collect import select_tasks
    from turnrl.engines import EngineAgent
    from turnrl.train import Evaluation

    split = args.eval_split if args.eval_split is not None else args.split
    if split == args.split:
        where = domain
    else:
        extra = {"seed": args.seed} if args.env.startswith("synthetic:") else {}
        where = envs.load(args.env, root=args.root, split=split, **extra)
    temperature = 0.0 if args.eval_temperature is None else args.eval_temperature
    agent = EngineAgent(engine.with_temperature(temperature))
    chosen = select_tasks(where, args.eval_tasks or "all")
    # Some domains have one split only (tau-bench airline), and synthetic ones ignore it.
    trained = {(t.id, t.instruction) for t in tasks}
    seen = {(t.id, t.instruction) for t in chosen} & trained
    if seen and rank == 0:
        print(
            f"note: {len(seen)} of the {len({t.id for t in chosen})} evaluation tasks are "
            "training tasks too (--eval-split, --eval-tasks and --tasks choose held-out ones)",
            file=sys.stderr,
        )
    return Evaluation(
        tasks=chosen,
        every=args.eval_every,
        samples=args.eval_samples or 1,
        domain=where,
        make_agent=lambda: agent,
        before_training=args.eval_before,
        buffer_dir=out / "eval",
    )


def _metrics_rows(metrics: Any) -> list[dict[str, Any]]:
    """The readable lines of ``metrics.jsonl`` (none when it is missing)."""
    import json

    rows = []
    if metrics.exists():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _drop_cut_line(metrics: Any) -> None:
    """Drop the end of ``metrics.jsonl`` that a kill cut off mid-line, so that
    the resumed run's first line starts a line of its own."""
    if not metrics.exists():
        return
    data = metrics.read_bytes()
    if data and not data.endswith(b"\n"):
        whole = data.rfind(b"\n") + 1
        print(
            f"--resume: the last line of {metrics} was cut short ({len(data) - whole} bytes, "
            "not JSON); it is dropped",
            file=sys.stderr,
        )
        with metrics.open("r+b") as f:
            f.truncate(whole)


def _resumed_evaluation(
    evaluation: Evaluation,
    checkpoint: Mapping[str, Any],
    first_step: int,
    metrics: Any,
    rank: int,
) -> Evaluation:
    """The evaluation of a resumed run: the checkpoint's step (the one before
    ``first_step``) is evaluated first when an evaluation was due after it
    (``checkpoint["evaluation_due"]``; else when it was an every-N-th step) and
    ``metrics`` has none of it (the run stopped during it), and never twice."""
    import dataclasses

    saved = first_step - 1
    evaluated = any(
        row.get("step") == saved and "eval/success_rate" in row for row in _metrics_rows(metrics)
    )
    due = checkpoint.get("evaluation_due")
    if not isinstance(due, bool):  # a checkpoint of a run without evaluation
        due = (saved + 1) % evaluation.every == 0
    if evaluated and evaluation.before_training:
        if rank == 0:
            print(
                f"--eval-before: the adapter of step {saved} was evaluated already "
                f"({metrics}); it is not evaluated again",
                file=sys.stderr,
            )
        return dataclasses.replace(evaluation, before_training=False)
    if not evaluated and not evaluation.before_training and due:
        if rank == 0:
            print(
                f"--resume: the evaluation after step {saved} is missing from {metrics} (the "
                "run stopped during it?); it runs before the first step",
                file=sys.stderr,
            )
        return dataclasses.replace(evaluation, before_training=True)
    return evaluation


def _online_calibrator(
    args: argparse.Namespace, checkpoint: Mapping[str, Any], where: Any, resuming: bool, rank: int
) -> OnlineCalibrator:
    """``turnrl train``'s calibrator: a new one starting from ``--tiers``, or the
    checkpoint's (its rewards and window) run with this run's settings."""
    from turnrl.calibration import OnlineCalibrator
    from turnrl.exceptions import InvalidInputError

    settings = {
        "every": args.calibrate_every,
        "window": args.calibrate_window,
        "min_trajectories": args.calibrate_min_trajectories,
    }
    saved = checkpoint.get("calibrator")
    if saved is None:
        if resuming and rank == 0:
            print(
                "--resume: the checkpoint holds no calibrator; calibration starts afresh from "
                f"--tiers {args.tiers or 'naive'}, its steps counted from here",
                file=sys.stderr,
            )
        return OnlineCalibrator(
            args.tiers or "naive", estimator=args.estimator, **_estimator_params(args), **settings
        )
    if not isinstance(saved, Mapping) or not isinstance(saved.get("calibrate_kwargs", {}), Mapping):
        raise InvalidInputError(f"--resume: {where}: 'calibrator' is not a calibrator state")
    if args.tiers is not None and rank == 0:
        print(
            f"--resume: --tiers {args.tiers} is not used: the rewards go on from the "
            "checkpoint's calibrator",
            file=sys.stderr,
        )
    state = dict(saved)
    changes = _setting_changes({key: state.get(key) for key in settings}, settings, "calibrator ")
    state.update(settings)
    # The direction check follows this run's estimator and its parameters.
    kwargs = dict(state.get("calibrate_kwargs") or {})
    estimator_keys = ("estimator", *ESTIMATOR_OPTIONS, "turn_norm")
    had = {key: kwargs.pop(key) for key in estimator_keys if key in kwargs}
    had.setdefault("estimator", "gtpo_hybrid")
    wanted = {"estimator": args.estimator, **_estimator_params(args)}
    changes += _setting_changes(had, wanted, "calibrator ")
    state["calibrate_kwargs"] = {**kwargs, **wanted}
    if isinstance(state.get("history"), list):
        # A smaller window keeps the most recent steps.
        state["history"] = state["history"][-args.calibrate_window :]
    try:
        online = OnlineCalibrator.from_state_dict(state)
    except InvalidInputError as e:
        raise InvalidInputError(f"--resume: {where}: {e}") from None
    if changes and rank == 0:
        print(
            "--resume: this run's settings replace the checkpoint's: " + "; ".join(changes),
            file=sys.stderr,
        )
    return online


def _resume_generators(adapter: Any, rank: int, seed: int) -> None:
    """Put back this rank's generators saved with ``adapter`` and say what the
    checkpoint lacks: a note that is the same on every rank (no file, an older
    turnrl's file) on rank 0 only, one about this rank's own state (a run
    resumed on more ranks) on each rank lacking it."""
    from turnrl.train import _load_rng_state

    missing, own = _load_rng_state(adapter, rank)
    if missing is not None and (rank == 0 or own):
        print(
            f"--resume: {missing}; the generators it lacks go on from --seed "
            f"{seed}, not from where the stopped run left them",
            file=sys.stderr,
        )


# GTPOConfig's fields that turnrl train's options set as they are; for the
# others see LOSS_SWITCHES_OFF and LOSS_FIELDS_WITHOUT_OPTIONS.
LOSS_OPTIONS = {
    "micro_batch_size": "--micro-batch-size",
    "micro_batch_tokens": "--micro-batch-tokens",
    "ppo_epochs": "--ppo-epochs",
    "mini_batches": "--mini-batches",
    "policy_loss": "--policy-loss",
    "sapo_tau_pos": "--sapo-tau-pos",
    "sapo_tau_neg": "--sapo-tau-neg",
    "eps_low": "--eps-low",
    "eps_high": "--eps-high",
    "dual_clip": "--dual-clip",
    "beta": "--beta",
    "kl_estimator": "--kl-estimator",
    "kl_correction": "--kl-correction",
    "off_policy_mask": "--off-policy-mask",
    "top_entropy_quantile": "--top-entropy-quantile",
    "entropy_coef": "--entropy-coef",
    "temperature": "--temperature",
    "agg": "--agg",
    "max_grad_norm": "--max-grad-norm",
    "max_len": "--max-length",
    "rollout_correction": "--rollout-correction",
    "rollout_correction_cap": "--rollout-correction-cap",
    "importance_level": "--importance-level",
}


# GTPOConfig's booleans that a turnrl train flag turns off (True: not given).
LOSS_SWITCHES_OFF = {"skip_zero_advantage": "--no-skip-zero-advantage"}

# GTPOConfig's fields no turnrl train option sets (a checkpoint of a Python
# run may hold another value): a resume names them as the Python API does.
LOSS_FIELDS_WITHOUT_OPTIONS = ("backend",)


def _loss_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`turnrl.train._loss_settings` as a user of ``turnrl train`` gave
    them: keyed by the option that sets each (a flag that turns a setting off
    as ``given`` or ``not given``), a field no option sets as
    ``GTPOConfig.<field>``."""
    options: dict[str, Any] = {}
    for key, value in settings.items():
        if key in LOSS_OPTIONS:
            options[LOSS_OPTIONS[key]] = value
        elif key in LOSS_SWITCHES_OFF and isinstance(value, bool):
            options[LOSS_SWITCHES_OFF[key]] = "not given" if value else "given"
        else:  # backend, or a field of another turnrl's
            options[f"GTPOConfig.{key}"] = value
    return options


def _task_draw_options(draw: Mapping[str, Any]) -> dict[str, Any]:
    """A :func:`turnrl.train.task_draw` as ``turnrl train``'s options name it."""
    return {
        "--tasks-per-step": draw.get("tasks_per_step"),
        "--seed": draw.get("seed"),
        "task pool": f"{draw.get('tasks')} tasks (ids {draw.get('task_ids')})",
    }


def _filtering_options(saved: Any) -> dict[str, Any]:
    """Group filtering as ``turnrl train``'s options name it, from the checkpoint's
    ``"filter_groups"`` (:func:`turnrl.train.train_loop`; none: no filtering)."""
    from turnrl.train import DEFAULT_SAMPLING_ROUNDS

    if not isinstance(saved, Mapping) or saved.get("filter_groups") is None:
        return {"--filter-groups": "none"}
    rounds = saved.get("max_sampling_rounds")
    return {
        "--filter-groups": saved["filter_groups"],
        "--max-sampling-rounds": DEFAULT_SAMPLING_ROUNDS if rounds is None else rounds,
    }


def _setting_changes(
    before: Mapping[str, Any], after: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """``"<prefix><key> <before> -> <after>"`` for every key whose value differs
    (a key left out is the default; a setting switched off, None, is spelt
    ``none`` as the options take it)."""

    def shown(settings: Mapping[str, Any], key: str) -> Any:
        if key not in settings:
            return "default"
        return "none" if settings[key] is None else settings[key]

    return [
        f"{prefix}{key} {shown(before, key)} -> {shown(after, key)}"
        for key in dict.fromkeys([*before, *after])
        if before.get(key) != after.get(key)
    ]


def _note_setting_changes(what: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    """Prints ``--resume: <what>: <changes>`` (:func:`_setting_changes`) when a
    setting differs; a note, not a refusal."""
    changed = _setting_changes(before, after)
    if changed:
        print(f"--resume: {what}: " + "; ".join(changed), file=sys.stderr)


TURN_NORM_HELP = (
    "group-normalise each turn against the same turn of the other rollouts (position) or "
    "against all turns of the group (pooled) (default: %(default)s)"
)


ESTIMATOR_OPTIONS = ("gamma", "lam", "norm")


def _add_estimator_options(parser: argparse.ArgumentParser) -> None:
    """--gamma, --lam and --norm: the estimator's parameters, left at its defaults
    unless given."""
    parser.add_argument(
        "--gamma",
        type=_finite_number,
        help="discount of later turns' rewards, in [0, 1] (gtpo_hybrid; default 0.9)",
    )
    parser.add_argument(
        "--lam",
        type=_finite_number,
        help="weight of the outcome term (gtpo_hybrid, default 0.3) or of the turn term "
        "(mt_grpo, default 1.0)",
    )
    parser.add_argument(
        "--norm",
        choices=["std", "mean", "none", "rloo", "batch"],
        help="group normalisation: subtract the mean and divide by the std (default), only "
        "subtract the mean (Dr. GRPO), neither, subtract the mean of the group's other "
        "rollouts (rloo: RLOO's leave-one-out baseline), or subtract the group's mean and "
        "divide by the std over the whole batch (batch: TRL's scale_rewards='batch'; the "
        "batch is the rollouts a training step trains on, every rank's under torchrun, and "
        "calibrate's the rollouts it reads)",
    )


# The --gamma and --lam each built-in estimator takes (test_cli checks this
# against the core). A registered Python estimator gets every one given.
_BUILTIN_TAKES = {"grpo": (), "mt_grpo": ("lam",), "gtpo_hybrid": ("gamma", "lam")}


def _note_unused_estimator_options(args: argparse.Namespace, command: str) -> None:
    """A note on stderr per --gamma or --lam the chosen built-in estimator has
    no use for. Not refused: a --config file shared by runs of several
    estimators sets them for some, and a checkpoint's settings count an unused
    parameter as the same (train_loop compares their advantages)."""
    takes = _BUILTIN_TAKES.get(args.estimator)
    if takes is None:
        return
    for name in ("gamma", "lam"):
        value = getattr(args, name)
        if value is not None and name not in takes:
            users = " and ".join(e for e, params in _BUILTIN_TAKES.items() if name in params)
            print(
                f"turnrl {command}: note: --{name} {value:g} is not used: --estimator "
                f"{args.estimator} has no {name} (it is {users}'s)",
                file=sys.stderr,
            )


def _note_unused_loss_options(args: argparse.Namespace) -> None:
    """A note on stderr for --kl-estimator without --beta and
    --rollout-correction-cap without --rollout-correction, set away from
    their defaults: each shapes a term the run does not have. Notes, not
    refusals, as for --gamma and --lam: a --config file may set them for
    runs that have the term."""
    if not args.beta and args.kl_estimator != "k3":
        print(
            f"turnrl train: note: --kl-estimator {args.kl_estimator} is not used: it estimates "
            "the KL that --beta weighs, and --beta is 0",
            file=sys.stderr,
        )
    if args.rollout_correction is None and args.rollout_correction_cap != 2.0:
        print(
            f"turnrl train: note: --rollout-correction-cap {args.rollout_correction_cap:g} is "
            "not used: it caps --rollout-correction, which is off",
            file=sys.stderr,
        )


def _estimator_params(args: argparse.Namespace) -> dict[str, Any]:
    """The estimator parameters given on the command line (turn_norm included)."""
    given = {name: getattr(args, name) for name in (*ESTIMATOR_OPTIONS, "turn_norm")}
    return {name: value for name, value in given.items() if value is not None}


NO_THINKING_HELP = "render chats with enable_thinking=False (Qwen3's non-thinking mode)"

CALLS_PER_MESSAGE_HELP = (
    "run only the first N tool calls of each assistant message; the rest are dropped and "
    "counted (1 = tau-bench's tool-calling agent; default: all)"
)


def _finite_number(text: str) -> float:
    """argparse type: a finite float (NaN and infinities are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _logger_names(text: str) -> list[str]:
    """argparse type: comma-separated logger names, or none."""
    from turnrl.loggers import logger_names

    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["none"]:
        return []
    unknown = [name for name in names if name not in logger_names()]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown logger {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(logger_names())} (or none)"
        )
    return list(dict.fromkeys(names))


def _integer(text: str) -> int:
    """argparse type: an integer."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text!r}")
    return value


def _row_length(text: str) -> int:
    """argparse type: a token row length, at least 2 (one token to predict from, one to train)."""
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {text!r}")
    return value


def _positive_number(text: str) -> float:
    """argparse type: a finite float above 0."""
    value = _finite_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
    return value


def _top_p(text: str) -> float:
    """argparse type: nucleus sampling's share of the probability mass, in (0, 1]."""
    value = _finite_number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text!r}")
    return value


def _share(text: str) -> float:
    """argparse type: a share, a number in [0, 1]."""
    value = _finite_number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and at most 1, got {text!r}")
    return value


def _memory_share(text: str) -> float:
    """argparse type: a share of a GPU's memory, above 0 and at most 1."""
    value = _finite_number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text!r}")
    return value


def _top_k(text: str) -> int:
    """argparse type: how many of the likeliest tokens sampling keeps; 0 or
    vLLM's -1: all (off, given as 0)."""
    value = _integer(text)
    if value < -1:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer, or 0 (or vLLM's -1) for off, got {text!r}"
        )
    return max(value, 0)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """--top-p, --top-k, --min-p and --repetition-penalty as an engine's ``top_p``,
    ``top_k``, ``min_p`` and ``repetition_penalty`` (not given: off)."""
    options = _sampling_options(args)
    return {
        "top_p": options["--top-p"],
        "top_k": options["--top-k"] or None,
        "min_p": options["--min-p"],
        "repetition_penalty": options["--repetition-penalty"],
    }


def _sampling_options(args: argparse.Namespace | None) -> dict[str, Any]:
    """The rollouts' --top-p, --top-k, --min-p and --repetition-penalty as a
    checkpoint keeps them (``"sampling"``), keyed by option, off as 1, 0, 0 and
    1; ``args`` None: the defaults."""
    given = {
        "--top-p": (None if args is None else args.top_p, 1.0),
        "--top-k": (None if args is None else args.top_k, 0),
        "--min-p": (None if args is None else args.min_p, 0.0),
        "--repetition-penalty": (None if args is None else args.repetition_penalty, 1.0),
    }
    return {option: off if value is None else value for option, (value, off) in given.items()}


def _schedule_options(args: argparse.Namespace | None) -> dict[str, Any]:
    """The learning-rate schedule's options as a checkpoint keeps them
    (``"schedule"``); ``args`` None: the defaults."""
    if args is None:
        return {"--lr-schedule": "constant", "--warmup-steps": 0, "--min-lr-ratio": 0.0}
    return {
        "--lr-schedule": args.lr_schedule,
        "--warmup-steps": args.warmup_steps,
        "--min-lr-ratio": args.min_lr_ratio,
    }


def _non_negative_number(text: str) -> float:
    """argparse type: a finite float of at least 0."""
    value = _finite_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text!r}")
    return value


def _kl_estimator(text: str) -> str:
    """argparse type: a KL estimator's name, as its canonical one (verl's ``low_var_kl``: k3)."""
    from turnrl.exceptions import UnknownNameError
    from turnrl.kernels.kl_estimators import kl_estimator_name

    try:
        return kl_estimator_name(text)
    except UnknownNameError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _clip_width(text: str) -> float:
    """argparse type: a float of at least 0, inf included (no clip on that side)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0 (inf: no clip), got {text!r}")
    return value


def _above_one(text: str) -> float:
    """argparse type: a finite float above 1."""
    value = _finite_number(text)
    if value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 1, got {text!r}")
    return value


def _grad_norm(text: str) -> float | None:
    """argparse type: a finite float above 0, or ``none`` (no clipping)."""
    if text.strip().lower() == "none":
        return None
    try:
        return _positive_number(text)
    except argparse.ArgumentTypeError as e:
        # 0 turns clipping off in the Hugging Face Trainer; here it is none.
        raise argparse.ArgumentTypeError(f"{e} (none: no clipping)") from None


# The options with choices whose "none" is their default, off (None once parsed);
# elsewhere (--norm) "none" is a value like the others.
_CHOICES_OFF_AS_NONE = ("filter_groups", "rollout_correction")


def _or_none(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse type: what ``parse`` takes, or ``none`` for the option's default, off;
    so a command line can switch off what a --config file set, and what --resume
    prints as ``none`` is a value the option takes."""

    @functools.wraps(parse)
    def parse_or_none(text: str) -> Any:
        if text.strip().lower() == "none":
            return None
        return parse(text)

    return parse_or_none


class _Parser(argparse.ArgumentParser):
    """An argument parser that takes options spelled in full only, not argparse's
    abbreviations (``--mod`` for ``--model``): where options have two names a prefix
    may pick one the user did not mean, and an option added later would change what
    an abbreviation in someone's script means. Subcommands' parsers are of the
    parser's own class, so they take none either."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``turnrl`` command."""
    from turnrl.kernels.policy_losses import POLICY_LOSSES
    from turnrl.train import (
        DEFAULT_SAMPLING_ROUNDS,
        FILTER_GROUPS,
        IMPORTANCE_LEVELS,
        ROLLOUT_CORRECTIONS,
        TRUNCATIONS,
        GTPOConfig,
    )

    parser = _Parser(
        prog="turnrl",
        description="Multi-turn RL for tool-calling agents: advantages, calibration, training.",
    )
    parser.add_argument("--version", action="version", version=f"turnrl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="calibrate tier rewards on embedded synthetic rollouts (no data needed)",
        description="Synthetic rollouts with planted reward tiers: each tier's correlation with "
        "success, then, per estimator, the turns whose advantage has the wrong sign under the "
        "naive dense rewards and under the calibrated ones.",
    )
    demo.add_argument(
        "--tasks", type=_positive_int, default=256, help="synthetic tasks (default: %(default)s)"
    )
    demo.add_argument(
        "--group-size",
        type=_positive_int,
        default=8,
        help="rollouts per task (default: %(default)s)",
    )
    demo.add_argument(
        "--seed", type=_non_negative_int, default=0, help="random seed (default: %(default)s)"
    )
    demo.add_argument(
        "--estimators",
        nargs="+",
        default=["grpo", "mt_grpo", "gtpo_hybrid"],
        choices=estimator_names(),
        help="advantage estimators to compare (default: all three built-in ones)",
    )
    demo.add_argument(
        "--turn-norm", default="position", choices=["position", "pooled"], help=TURN_NORM_HELP
    )
    demo.set_defaults(run=_demo)

    cal = commands.add_parser(
        "calibrate",
        help="Iterative Reward Calibration over rollout buffers",
        description="Correlate each reward tier with task success over turnrl.rollout/1 "
        "buffers (plain or zstd), set tier rewards from the correlations, and check the "
        "advantage direction, iterating until no turn is misaligned.",
    )
    cal.add_argument("buffers", nargs="+", help="buffer files or glob patterns")
    cal.add_argument(
        "--tiers",
        default="naive",
        help="starting tier rewards: a TOML file or a preset (naive, sparse; default: %(default)s)",
    )
    cal.add_argument(
        "--estimator",
        default="gtpo_hybrid",
        choices=estimator_names(),
        help="advantage estimator for the direction check (default: %(default)s)",
    )
    cal.add_argument(
        "--turn-norm", default="position", choices=["position", "pooled"], help=TURN_NORM_HELP
    )
    _add_estimator_options(cal)
    cal.add_argument(
        "--variable",
        default="presence",
        choices=["presence", "count"],
        help="correlate tier presence (0/1) or turn count with success (default: %(default)s)",
    )
    cal.add_argument(
        "--target",
        type=_positive_number,
        default=1.0,
        help="largest |reward| after scaling (default: %(default)s)",
    )
    cal.add_argument(
        "--alpha",
        type=_positive_number,
        default=0.05,
        help="tiers with p >= alpha get reward 0 (default: %(default)s)",
    )
    cal.add_argument(
        "--min-abs-r",
        type=_non_negative_number,
        default=0.1,
        help="tiers with |r| below this get reward 0 (default: %(default)s)",
    )
    cal.add_argument(
        "--max-iterations",
        type=_positive_int,
        default=10,
        help="calibration rounds at most (default: %(default)s)",
    )
    cal.add_argument(
        "--success-threshold",
        type=_finite_number,
        default=1.0,
        help="an outcome >= this counts as success (default: %(default)s)",
    )
    cal.add_argument("--out", help="write calibrated tier rewards (TOML)")
    cal.add_argument("--report", help="write the full report (JSON)")
    cal.add_argument("--plot", help="write a plot of correlations and rewards (PNG)")
    cal.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="reader threads, shared by the files read at once (default: every core)",
    )
    cal.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="map files over a Ray cluster ('local' starts one)",
    )
    cal.add_argument("--quiet", action="store_true", help="no progress bar")
    cal.set_defaults(run=_calibrate)

    rollouts = commands.add_parser("rollouts", help="convert and inspect rollout buffers")
    rollout_commands = rollouts.add_subparsers(dest="rollouts_command", required=True)
    imp = rollout_commands.add_parser(
        "import-taubench",
        help="label tau-bench results with reward tiers and write a rollout buffer",
        description="Convert tau-bench's results JSON into a turnrl.rollout/1 buffer, labelling "
        "every assistant turn with its tier against the task's gold actions.",
    )
    imp.add_argument("results", help="tau-bench results JSON (a list of task runs)")
    imp.add_argument(
        "--env", required=True, help="domain of the run, e.g. taubench:airline (see turnrl.envs)"
    )
    imp.add_argument("--root", help="the tau-bench or tau2-bench checkout with the data")
    imp.add_argument("--split", help="task split of the run (default: the domain's)")
    imp.add_argument(
        "--tiers",
        default="naive",
        help="tier rewards to write on each turn: TOML file or preset (default: %(default)s)",
    )
    imp.add_argument("--out", required=True, help="buffer to write (.zst compresses)")
    imp.set_defaults(run=_import_taubench)

    sts = rollout_commands.add_parser(
        "stats",
        help="what rollout buffers hold: trajectories, success, pass^k, turns, tiers and "
        "stop reasons",
        description="Read rollout buffers (files or glob patterns, plain or zstd) and print "
        "their trajectories, tasks and groups, the success rate and tau-bench's pass^k (when "
        "every task has as many trajectories), assistant turns, per tier its turns, mean "
        "reward and the success rate of the trajectories holding it, and how episodes ended "
        "(meta's stop_reason, '(none)' where a record gives none; a reason starting with ( or \" "
        "is shown quoted): per reason its trajectories, "
        "their share and success rate, over all files and, given several, per file.",
    )
    sts.add_argument("buffers", nargs="+", help="buffer files or glob patterns")
    sts.add_argument(
        "--success-threshold",
        type=_finite_number,
        default=1.0,
        help="an outcome at or above this is a success (default: %(default)s)",
    )
    sts.add_argument("--json", action="store_true", help="print the figures as JSON")
    sts.add_argument(
        "--plot",
        metavar="FILE",
        help="write a plot of the figures (PNG): pass^k against k, per tier its share of the "
        "turns and the success rate of the trajectories holding it, and the stop reasons, "
        "per file given several",
    )
    sts.add_argument("--workers", type=_positive_int, help="reading threads (default: all cores)")
    sts.add_argument("--quiet", action="store_true", help="no progress bar")
    sts.set_defaults(run=_stats)

    col = rollout_commands.add_parser(
        "collect",
        help="run a served policy against a domain and write the episodes as a buffer",
        description="Run episodes of a policy behind an OpenAI-compatible endpoint (vllm serve, "
        "SGLang, a hosted API), or of a model run here (--engine, with a trained --adapter), "
        "with a simulated user, label every assistant turn with its tier, "
        "and write a turnrl.rollout/1 buffer. API keys come from OPENAI_API_KEY. Exits 1 when "
        "some episodes failed (the others are written).",
    )
    col.add_argument("--env", required=True, help="domain, e.g. tau2:airline (see turnrl.envs)")
    col.add_argument("--root", help="the tau-bench or tau2-bench checkout with the data")
    col.add_argument("--split", help="task split (default: the domain's)")
    col.add_argument(
        "--seed", type=int, default=0, help="seed of a synthetic domain (default: %(default)s)"
    )
    col.add_argument(
        "--tasks",
        default="all",
        help="all, START:STOP (indices) or comma-separated indices and ids (default: %(default)s)",
    )
    col.add_argument(
        "--samples",
        "--group-size",
        type=_positive_int,
        default=4,
        help="episodes per task, one group (default: %(default)s)",
    )
    col.add_argument(
        "--agent-model",
        required=True,
        help="the policy's model name at the endpoint; with --engine, a local folder, hub name "
        "or .gguf file",
    )
    col.add_argument("--agent-url", help="the policy's base URL (default: OPENAI_BASE_URL)")
    col.add_argument(
        "--engine",
        choices=["transformers", "vllm"],
        help="run --agent-model here instead of asking an endpoint (to evaluate a trained "
        "adapter: --adapter OUT/adapter)",
    )
    col.add_argument("--adapter", help="with --engine: a LoRA adapter folder to put on the model")
    col.add_argument("--no-thinking", action="store_true", help=NO_THINKING_HELP)
    col.add_argument("--dtype", help="with --engine transformers: model dtype (default: bfloat16)")
    col.add_argument(
        "--device", help="with --engine transformers: cuda or cpu (default: cuda when there is one)"
    )
    col.add_argument(
        "--vllm-gpu-memory",
        type=_memory_share,
        help="with --engine vllm: share of GPU memory vLLM may take (default: vLLM's, 0.9)",
    )
    col.add_argument(
        "--max-model-len",
        type=_positive_int,
        help="with --engine vllm: the context vLLM allocates, in tokens (default: the "
        "model's); each reply is fitted to the room its chat leaves, and a chat with none "
        "ends its episode",
    )
    col.add_argument(
        "--cache-implementation",
        choices=_CACHE_IMPLEMENTATIONS,
        help=_CACHE_IMPLEMENTATION_HELP,
    )
    col.add_argument(
        "--agent-temperature",
        "--temperature",
        type=_non_negative_number,
        default=1.0,
        help="sampling temperature of the policy (default: %(default)s)",
    )
    col.add_argument(
        "--top-p",
        type=_top_p,
        help="nucleus sampling: the policy samples from the likeliest tokens holding this "
        "share of the probability (default: a served policy's server's own default, else 1: "
        "all tokens)",
    )
    col.add_argument(
        "--top-k",
        type=_top_k,
        help="the policy samples from its K likeliest tokens only; 0 or -1: all (default: a served "
        "policy's server's own default, else 0)",
    )
    col.add_argument(
        "--min-p",
        type=_share,
        help="the policy samples from the tokens at least this share as likely as its likeliest "
        "only; 0: all (default: a served policy's server's own default, else 0)",
    )
    col.add_argument(
        "--repetition-penalty",
        type=_positive_number,
        help="penalise the tokens already in the prompt or the reply (above 1: less likely); "
        "1: off (default: a served policy's server's own default, else 1)",
    )
    col.add_argument(
        "--max-tokens",
        "--max-new-tokens",
        type=_positive_int,
        help="cap on each policy reply's tokens (with --engine: default 1024)",
    )
    col.add_argument(
        "--user",
        choices=["llm", "scripted"],
        default="llm",
        help="simulated user: a chat model, or the deterministic scripted one "
        "(default: %(default)s)",
    )
    col.add_argument("--user-model", help="the user simulator's model name (--user llm)")
    col.add_argument("--user-url", help="the user simulator's base URL (default: OPENAI_BASE_URL)")
    col.add_argument(
        "--judge-model", help="judge tau2-bench's natural-language assertions with this model"
    )
    col.add_argument("--judge-url", help="the judge's base URL (default: OPENAI_BASE_URL)")
    col.add_argument(
        "--tiers",
        default="naive",
        help="tier rewards to write on each turn: TOML file or preset (default: %(default)s)",
    )
    col.add_argument(
        "--max-steps",
        type=_positive_int,
        help="step limit in the domain's own unit (default: the benchmark's; see README)",
    )
    col.add_argument(
        "--calls-per-message", type=_positive_int, metavar="N", help=CALLS_PER_MESSAGE_HELP
    )
    col.add_argument(
        "--workers",
        type=_positive_int,
        default=8,
        help="episodes run at once (default: %(default)s)",
    )
    col.add_argument(
        "--group-prefix",
        default="",
        help="prefix of every group name, e.g. step-0001/ to keep steps' groups apart when "
        "buffers are read together (default: none)",
    )
    col.add_argument(
        "--max-consecutive-failures",
        type=_non_negative_int,
        default=16,
        help="cancel the episodes not yet started after this many failures in a row; 0 never "
        "(default: %(default)s)",
    )
    col.add_argument("--quiet", action="store_true", help="no progress bar")
    col.add_argument("--out", required=True, help="buffer to write (.zst compresses)")
    col.set_defaults(run=_collect)

    tr = commands.add_parser(
        "train",
        help="train a LoRA policy with GTPO on a domain (rollouts, advantages, updates)",
        description="Each step: run --group-size episodes of --tasks-per-step tasks with the "
        "policy being trained (transformers generate, or vLLM or a vLLM server with the "
        "adapter reloaded after each step) and a simulated user, label the turns with tiers, "
        "compute per-turn advantages, and take --ppo-epochs x --mini-batches optimizer steps "
        "with the fused GTPO loss; with --calibrate-every, "
        "re-derive the tier rewards from the recent steps' rollouts (Iterative Reward "
        "Calibration) as it goes; with --filter-groups, leave out the groups without signal "
        "and sample more tasks in their place. Writes OUT/rollouts/step-N.jsonl "
        "(for turnrl calibrate; an extra sampling round's in step-N.round-R.jsonl), "
        "OUT/adapter (after every step), OUT/metrics.jsonl and, with "
        "--plot, OUT/metrics.png; with --save-every, OUT/checkpoints/step-S, and with "
        "--eval-every, OUT/best. Under torchrun (for example torchrun --nproc-per-node 8 -m "
        "turnrl.cli train ...) every rank trains a replica on its share of each step's tasks "
        "and writes OUT/rollouts/step-N.rank-R.jsonl; OUT must be one folder for all ranks.",
    )
    tr.add_argument(
        "--model", required=True, help="base model: a local folder, a hub name or a .gguf file"
    )
    tr.add_argument("--env", required=True, help="domain, e.g. tau2:airline (see turnrl.envs)")
    tr.add_argument("--root", help="the tau-bench or tau2-bench checkout with the data")
    tr.add_argument("--split", help="task split (default: the domain's)")
    tr.add_argument(
        "--tasks", default="all", help="tasks to draw from, as for collect (default: %(default)s)"
    )
    tr.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the task order, a synthetic domain, a fresh adapter's weights, "
        "torch's sampling and Python's and numpy's global generators (default: %(default)s)",
    )
    tr.add_argument(
        "--steps",
        type=_positive_int,
        default=10,
        help="training steps, each its rollouts and then --ppo-epochs x --mini-batches "
        "optimizer steps; after --resume, the steps still to run (default: %(default)s)",
    )
    tr.add_argument(
        "--tasks-per-step",
        type=_positive_int,
        default=8,
        help="tasks per step (default: %(default)s)",
    )
    tr.add_argument(
        "--group-size",
        "--samples",
        type=_positive_int,
        default=8,
        help="rollouts per task (default: %(default)s)",
    )
    tr.add_argument(
        "--engine",
        choices=["transformers", "vllm", "server"],
        default="transformers",
        help="rollout engine: the trained model itself, vLLM in this process, or a vLLM "
        "server at --agent-url that loads each new adapter (default: %(default)s)",
    )
    tr.add_argument(
        "--agent-url",
        help="with --engine server: the policy server's base URL, e.g. http://gpu-host:8000/v1 "
        "(default: OPENAI_BASE_URL)",
    )
    tr.add_argument(
        "--served-model-name",
        help="with --engine server: the base model's name at the server (default: --model)",
    )
    tr.add_argument(
        "--max-model-len",
        type=_positive_int,
        help="the policy's context length in tokens: with --engine vllm, the one vLLM "
        "allocates (default: the model's); with --engine server, the server's --max-model-len "
        "(default: what its /v1/models gives). Each reply is fitted to the room its chat "
        "leaves, and a chat with none ends its episode",
    )
    tr.add_argument(
        "--vllm-gpu-memory",
        type=_memory_share,
        default=0.4,
        help="share of GPU memory vLLM may take, beside the trained model (default: %(default)s)",
    )
    tr.add_argument(
        "--cache-implementation",
        choices=_CACHE_IMPLEMENTATIONS,
        help=_CACHE_IMPLEMENTATION_HELP,
    )
    tr.add_argument(
        "--vllm-sleep",
        action="store_true",
        help="with --engine vllm: put vLLM to sleep during each update (its KV cache dropped, "
        "its weights in CPU memory), so the trainer has the GPU memory it held; it wakes for "
        "the next rollouts",
    )
    tr.add_argument(
        "--max-new-tokens",
        "--max-tokens",
        type=_positive_int,
        default=512,
        help="per policy reply (default: %(default)s)",
    )
    tr.add_argument(
        "--temperature",
        "--agent-temperature",
        type=_positive_number,
        default=1.0,
        help="sampling temperature (default: %(default)s)",
    )
    tr.add_argument(
        "--top-p",
        type=_top_p,
        help="nucleus sampling of the rollouts (and of evaluation above temperature 0): the "
        "likeliest tokens holding this share of the probability (default: 1, all); no "
        "sampler log-probs then, so no --rollout-correction",
    )
    tr.add_argument(
        "--top-k",
        type=_top_k,
        help="the rollouts (and evaluation above temperature 0) sample from the K likeliest "
        "tokens only; 0 or -1: all (default: 0); no sampler log-probs then, so no "
        "--rollout-correction",
    )
    tr.add_argument(
        "--min-p",
        type=_share,
        help="the rollouts (and evaluation above temperature 0) sample from the tokens at "
        "least this share as likely as the likeliest only; 0: all (default: 0); no sampler "
        "log-probs then, so no --rollout-correction",
    )
    tr.add_argument(
        "--repetition-penalty",
        type=_positive_number,
        help="the rollouts (and evaluation, greedy included) penalise the tokens already in the "
        "prompt or the reply (above 1: less likely); 1: off (default: 1); no sampler "
        "log-probs then, so no --rollout-correction",
    )
    tr.add_argument(
        "--no-thinking",
        action="store_true",
        help=NO_THINKING_HELP,
    )
    tr.add_argument(
        "--user",
        choices=["llm", "scripted"],
        default="llm",
        help="simulated user (default: %(default)s)",
    )
    tr.add_argument("--user-model", help="the user simulator's model name (--user llm)")
    tr.add_argument("--user-url", help="the user simulator's base URL (default: OPENAI_BASE_URL)")
    tr.add_argument(
        "--calls-per-message", type=_positive_int, metavar="N", help=CALLS_PER_MESSAGE_HELP
    )
    tr.add_argument(
        "--max-steps",
        type=_positive_int,
        help="step limit of one episode in the domain's own unit, as tau-bench's "
        "max_num_steps (not TRL's max_steps: training steps are --steps) (default: the "
        "benchmark's; see README)",
    )
    tr.add_argument(
        "--tiers",
        help="tier rewards (the starting ones with --calibrate-every): TOML file or preset "
        "(default: naive)",
    )
    tr.add_argument(
        "--calibrate-every",
        type=_positive_int,
        metavar="N",
        help="Iterative Reward Calibration during training: re-derive the tier rewards every N "
        "steps from the rollouts of the last --calibrate-window steps (default: fixed --tiers)",
    )
    tr.add_argument(
        "--calibrate-window",
        type=_positive_int,
        default=20,
        metavar="W",
        help="steps of rollouts the calibration reads (default: %(default)s)",
    )
    tr.add_argument(
        "--calibrate-min-trajectories",
        type=_positive_int,
        default=64,
        metavar="M",
        help="calibrate only once the window holds M trajectories (default: %(default)s)",
    )
    tr.add_argument(
        "--estimator",
        default="gtpo_hybrid",
        choices=estimator_names(),
        help="advantage estimator (default: %(default)s)",
    )
    tr.add_argument(
        "--turn-norm",
        choices=["position", "pooled"],
        help=TURN_NORM_HELP.replace("%(default)s", "position"),
    )
    _add_estimator_options(tr)
    tr.add_argument(
        "--lora-rank", type=_positive_int, default=16, help="LoRA rank (default: %(default)s)"
    )
    tr.add_argument("--lora-alpha", type=_positive_int, help="default: twice the rank")
    tr.add_argument(
        "--lora-targets",
        default="all-linear",
        help="modules to adapt, comma-separated, or all-linear (default: %(default)s)",
    )
    tr.add_argument(
        "--lr",
        type=_non_negative_number,
        default=1e-5,
        help="AdamW learning rate (default: %(default)s)",
    )
    tr.add_argument(
        "--lr-schedule",
        choices=["constant", "linear", "cosine"],
        default="constant",
        help="after the warmup: constant, or down along a straight line (linear, TRL's "
        "default) or half a cosine towards --min-lr-ratio of --lr over the run's steps "
        "(--steps more after a --resume) (default: %(default)s)",
    )
    tr.add_argument(
        "--min-lr-ratio",
        type=_share,
        default=0.0,
        help="with --lr-schedule linear or cosine: the share of --lr the schedule decays "
        "towards, in [0, 1] (verl's min_lr_ratio) (default: %(default)s)",
    )
    tr.add_argument(
        "--warmup-steps",
        type=_non_negative_int,
        default=0,
        help="optimizer steps of linear learning-rate warmup (default: %(default)s)",
    )
    tr.add_argument(
        "--micro-batch-size",
        type=_positive_int,
        default=4,
        help="rows per forward/backward (default: %(default)s)",
    )
    tr.add_argument(
        "--no-skip-zero-advantage",
        dest="skip_zero_advantage",
        action="store_false",
        help="run rows whose advantages are all 0 too (without a KL or entropy term they add "
        "nothing to the loss, so by default they are skipped, and a step with nothing else "
        "takes no optimizer step)",
    )
    tr.add_argument(
        "--micro-batch-tokens",
        type=_or_none(_positive_int),
        help="instead of --micro-batch-size: padded tokens per forward/backward (rows x the "
        "longest), rows grouped longest first",
    )
    tr.add_argument(
        "--ppo-epochs",
        type=_positive_int,
        default=1,
        help="passes over each step's rollouts, each taking --mini-batches optimizer steps "
        "(default: %(default)s)",
    )
    tr.add_argument(
        "--mini-batches",
        type=_positive_int,
        default=1,
        metavar="N",
        help="optimizer steps per epoch: the step's rollouts (each rank's share under "
        "torchrun) are cut into N parts, a task's group kept in one where the groups allow, "
        "the same parts every epoch, each one step whose loss is its own mean (verl's "
        "ppo_mini_batch_size as a count, TRL's steps_per_generation; the log-probs the "
        "ratios are taken to are the step's start's, so every part after the first is "
        "off-policy); at most the step's rollouts (--tasks-per-step x --group-size), under "
        "torchrun the busiest rank's share (--tasks-per-step / ranks, rounded up, x "
        "--group-size), so that no part is empty on every rank (default: %(default)s)",
    )
    tr.add_argument(
        "--eps-low",
        type=_clip_width,
        default=0.2,
        help="ratio clip below 1 (default: %(default)s)",
    )
    tr.add_argument(
        "--eps-high",
        type=_clip_width,
        default=0.28,
        help="ratio clip above 1, DAPO's clip-higher (default: %(default)s)",
    )
    tr.add_argument(
        "--beta",
        type=_non_negative_number,
        default=0.0,
        help="KL to the base model (default: %(default)s)",
    )
    tr.add_argument(
        "--kl-estimator",
        type=_kl_estimator,
        default="k3",
        help="the per-token KL estimate --beta weighs, of x = log(pi / pi_base): k3 "
        "(exp(-x) + x - 1, verl's low_var_kl, TRL's), k1 (x), abs (|x|), k2 (x^2 / 2), or "
        "k1+, abs+, k3+: that value with k2's gradient (verl's kl_loss_type; its names are "
        "taken too) (default: %(default)s)",
    )
    tr.add_argument(
        "--kl-correction",
        action="store_true",
        help="weight each token's KL estimate by its ratio pi / pi_old, gradient kept "
        "(DeepSeek-V3.2's unbiased estimate, TRL's use_bias_correction_kl): the tokens were "
        "sampled from pi_old, which later --ppo-epochs or --mini-batches have moved from; "
        "needs --beta",
    )
    tr.add_argument(
        "--off-policy-mask",
        type=_or_none(_positive_number),
        metavar="DELTA",
        help="DeepSeek-V3.2's off-policy sequence masking (TRL's off_policy_mask_threshold; "
        "its example 0.5): an assistant turn with a negative advantage whose mean "
        "log(pi_sampler / pi) over its trained tokens exceeds DELTA gets no policy gradient "
        "(its KL and entropy terms stay) (default: off)",
    )
    tr.add_argument(
        "--top-entropy-quantile",
        type=_share,
        default=1.0,
        metavar="RHO",
        help="train the policy gradient on the share RHO of each micro-batch's trained tokens "
        "with the highest entropy alone ('Beyond the 80/20 Rule', arXiv 2506.01939; TRL's "
        "top_entropy_quantile; the paper's 0.2); the others keep their KL and entropy terms "
        "(default: %(default)s, every token)",
    )
    tr.add_argument(
        "--entropy-coef",
        type=_finite_number,
        default=0.0,
        help="weight of the entropy bonus, as verl's entropy_coeff (default: %(default)s)",
    )
    tr.add_argument(
        "--policy-loss",
        choices=POLICY_LOSSES,
        default="ppo",
        help="the policy-gradient term: ppo (the clipped surrogate; a clipped token has no "
        "gradient), cispo (MiniMax-M1: the clipped importance weight, detached, times "
        "-A grad log pi, so every token keeps a gradient; give it a far larger --eps-high, "
        "ScaleRL's cap of 5 on the weight is --eps-low 1 --eps-high 4) or sapo (Qwen's SAPO: "
        "a smooth gate -A sigmoid(tau (r - 1)) 4 / tau instead of the clip, the plain policy "
        "gradient on-policy, fading off it; --eps-low/--eps-high unused) (default: %(default)s)",
    )
    for sign, default, whose in (
        ("pos", GTPOConfig.sapo_tau_pos, "positive"),
        ("neg", GTPOConfig.sapo_tau_neg, "other"),
    ):
        tr.add_argument(
            f"--sapo-tau-{sign}",
            type=_positive_number,
            metavar="TAU",
            help=f"with --policy-loss sapo: the gate's temperature of the {whose} advantages' "
            "tokens (TRL's sapo_temperature_" + sign + "); the larger, the faster the gate "
            f"closes off-policy (default: {default}, the paper's)",
        )
    tr.add_argument(
        "--dual-clip",
        type=_or_none(_above_one),
        help="verl's clip_ratio_c: the loss of a token with a negative advantage is capped "
        "at this many times the advantage's size (default: no cap)",
    )
    tr.add_argument(
        "--max-grad-norm",
        type=_grad_norm,
        default=1.0,
        help="clip the gradients to this global norm, or none (default: %(default)s)",
    )
    tr.add_argument(
        "--weight-decay",
        type=_non_negative_number,
        default=0.0,
        help="AdamW's weight decay on the trained weights (default: %(default)s)",
    )
    tr.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each decoder layer's activations in the backward instead of keeping "
        "them: less memory for long rows, for about a third more decoder time",
    )
    tr.add_argument(
        "--agg",
        default="token_mean",
        choices=["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "dr_grpo"],
        help="loss aggregation (default: %(default)s)",
    )
    tr.add_argument(
        "--importance-level",
        choices=IMPORTANCE_LEVELS,
        default="token",
        help="which tokens share one importance ratio, GSPO-style (the geometric mean of "
        "their ratios): each token its own (token), each assistant turn's (turn), or each "
        "token row's (sequence: a packed conversation, else one turn); GSPO clips far "
        "tighter, so set --eps-low/--eps-high (its paper: 3e-4/4e-4) (default: %(default)s)",
    )
    tr.add_argument(
        "--max-length",
        type=_or_none(_row_length),
        help="cut token rows longer than this (see --truncation)",
    )
    tr.add_argument(
        "--truncation",
        choices=TRUNCATIONS,
        default="right",
        help="what --max-length does to a longer row: keep its start (right; a per-turn row "
        "then loses its reply first), keep its end (left: the reply, trained without the "
        "start of its context), or stop with an error (default: %(default)s)",
    )
    tr.add_argument(
        "--pack",
        choices=["exact", "rendered", "never"],
        default="exact",
        help="one token row per episode only when every turn's context is its prompt "
        "(exact), whenever the template appends (rendered: earlier turns trained on their "
        "rendering), or one row per turn (never) (default: %(default)s)",
    )
    tr.add_argument(
        "--mask-truncated",
        action="store_true",
        help="do not train on replies cut at --max-new-tokens",
    )
    tr.add_argument(
        "--filter-groups",
        choices=[*FILTER_GROUPS, "none"],
        help="DAPO's dynamic sampling (verl's filter_groups): leave out of the update the "
        "groups without signal (outcome: every episode's reward the same, DAPO's criterion; "
        "advantage: every trained turn's advantage 0 under --estimator, which keeps a group "
        "whose turn rewards differ) and draw more tasks until the step has as many groups "
        "with signal as it drew, up to --max-sampling-rounds rounds (default: no filtering)",
    )
    tr.add_argument(
        "--max-sampling-rounds",
        type=_positive_int,
        metavar="N",
        help="with --filter-groups: rounds of --tasks-per-step tasks a step collects at most, "
        f"its own included (verl's max_num_gen_batches; default {DEFAULT_SAMPLING_ROUNDS})",
    )
    tr.add_argument(
        "--rollout-correction",
        choices=[*ROLLOUT_CORRECTIONS, "none"],
        help="with --engine vllm: weight each token's advantage by pi_train / pi_vllm of the "
        "token or of its turn, capped (truncate) or zeroed above the cap (mask), as TRL's "
        "vllm_importance_sampling_mode (default: none; the mismatch is reported either way)",
    )
    tr.add_argument(
        "--rollout-correction-cap",
        type=_finite_number,
        default=2.0,
        help="the cap of --rollout-correction, at least 1 (default: %(default)s)",
    )
    tr.add_argument("--dtype", default="bfloat16", help="model dtype (default: %(default)s)")
    tr.add_argument(
        "--dist-timeout",
        type=_positive_number,
        default=120.0,
        help="under torchrun: minutes a rank waits for the others (their rollouts) before the "
        "job fails (default: %(default)s)",
    )
    tr.add_argument(
        "--device",
        help="cuda or cpu (default: cuda when there is one; under torchrun, the rank's "
        "cuda:LOCAL_RANK)",
    )
    tr.add_argument(
        "--workers",
        type=_positive_int,
        default=8,
        help="episodes run at once (default: %(default)s)",
    )
    tr.add_argument(
        "--eval-every",
        type=_positive_int,
        metavar="N",
        help="held-out evaluation: run the policy on the evaluation tasks after every N-th step "
        "and after the last, adding eval/success_rate and eval/pass^k to metrics.jsonl and the "
        "episodes to OUT/eval/step-N.jsonl, and keeping the adapter of the best "
        "eval/success_rate as OUT/best (default: no evaluation)",
    )
    tr.add_argument(
        "--eval-split", help="split of the evaluation tasks (default: --split, the domain's)"
    )
    tr.add_argument(
        "--eval-tasks", help="evaluation tasks, as for collect (default: all of --eval-split)"
    )
    tr.add_argument(
        "--eval-samples",
        type=_positive_int,
        metavar="K",
        help="episodes per evaluation task; pass^k is reported for k = 1, 2, 4, ... and K "
        "(default: 1)",
    )
    tr.add_argument(
        "--eval-temperature",
        type=_non_negative_number,
        help="the policy's sampling temperature in evaluation (default: 0, greedy, as "
        "tau-bench's run.py)",
    )
    tr.add_argument(
        "--eval-before",
        action="store_true",
        help="evaluate the starting policy too, before the first step (its metrics line has "
        "the step before)",
    )
    tr.add_argument(
        "--save-every",
        type=_positive_int,
        metavar="N",
        help="also keep a copy of OUT/adapter as OUT/checkpoints/step-S after every N-th step "
        "and after the last, without the optimizer's state (a --resume from one starts AdamW "
        "afresh) (default: OUT/adapter alone, overwritten every step)",
    )
    tr.add_argument(
        "--save-total-limit",
        type=_positive_int,
        metavar="K",
        help="keep only the K newest of --save-every's snapshots; OUT/best (with --eval-every, "
        "the adapter of the best eval/success_rate) is apart and stays (default: keep all)",
    )
    tr.add_argument(
        "--resume", action="store_true", help="continue from OUT/adapter and OUT/metrics.jsonl"
    )
    tr.add_argument("--plot", action="store_true", help="write OUT/metrics.png at the end")
    tr.add_argument(
        "--report-to",
        type=_logger_names,
        default="none",
        metavar="LOGGERS",
        help="also log each step's metrics to these trackers, comma-separated: tensorboard "
        "(OUT/tensorboard), wandb (the run's id kept in OUT/wandb_run_id, so --resume goes on "
        "with it) (default: %(default)s)",
    )
    tr.add_argument("--run-name", help="the run's name in W&B (default: OUT's folder name)")
    tr.add_argument(
        "--wandb-project",
        help="the W&B project (default: WANDB_PROJECT if set, else turnrl)",
    )
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.add_argument("--out", required=True, help="output folder")
    tr.set_defaults(run=_train)

    merge = commands.add_parser(
        "merge-adapter",
        help="fold a trained LoRA adapter into its base model, for serving",
        description="Load the base model, put the adapter on it and merge its weights in, then "
        "save the whole model (safetensors, config, tokenizer) as a plain Hugging Face folder "
        "that vllm serve and --agent-model load without PEFT. Written beside --out and renamed "
        "into place.",
    )
    merge.add_argument("adapter", help="adapter folder, e.g. OUT/best or OUT/adapter")
    merge.add_argument(
        "--model",
        help="the base model: folder, hub name or .gguf file (default: the one the adapter's "
        "adapter_config.json names)",
    )
    merge.add_argument(
        "--dtype", default="bfloat16", help="dtype of the merged weights (default: %(default)s)"
    )
    merge.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    merge.add_argument("--out", required=True, help="folder of the merged model")
    merge.set_defaults(run=_merge_adapter)

    def commands_of(parent: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
        below = _subparsers(parent)
        if below is None:
            return [parent]
        return [leaf for child in below.choices.values() for leaf in commands_of(child)]

    for command in commands_of(parser):
        # Read before parsing (expand_config); here for --help and the recorded options.
        command.add_argument(
            "--config",
            metavar="FILE",
            help="options from a TOML, YAML or JSON file (option names as keys, e.g. "
            "lr = 1e-5); those given on the command line win (default: none)",
        )
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _command(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[list[str], argparse.ArgumentParser]:
    """The command words that start ``argv`` (``["rollouts", "collect"]``) and the
    parser of that command's options."""
    words: list[str] = []
    for token in argv:
        commands = _subparsers(parser)
        if commands is None or token not in commands.choices:
            break
        words.append(token)
        parser = commands.choices[token]
    return words, parser


def _yaml_loader(yaml: Any) -> Any:
    """pyyaml's safe loader with YAML 1.2's plain numbers and booleans: YAML 1.1
    reads ``tasks: 5:10`` as the base-60 number 310 and ``split: off`` as False."""
    import re

    integer, decimal, boolean = (f"tag:yaml.org,2002:{t}" for t in ("int", "float", "bool"))

    class Loader(yaml.SafeLoader):  # type: ignore[misc,name-defined]
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (integer, decimal, boolean)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        boolean, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )
    Loader.add_implicit_resolver(integer, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
    Loader.add_implicit_resolver(
        decimal,
        re.compile(
            r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$"
            r"|^[-+]?[0-9]+[eE][-+]?[0-9]+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
        ),
        list("-+0123456789."),
    )
    return Loader


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The options in a ``--config`` file: a TOML, YAML or JSON mapping of option
    names (``lr``, ``eval-every`` or ``eval_every``) to values."""
    import json
    from pathlib import Path

    from turnrl.exceptions import InvalidInputError, TurnrlIOError

    where = Path(path)
    try:
        text = where.read_text(encoding="utf-8-sig")  # a byte-order mark is no content
    except OSError as e:
        raise TurnrlIOError(f"--config {where}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InvalidInputError(
            f"--config {where}: not UTF-8 text (byte {e.start}: {e.reason})"
        ) from None
    suffix = where.suffix.lower()
    try:
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:
                import tomli as tomllib
            values = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise InvalidInputError(
                    f"--config {where}: YAML needs the pyyaml package (pip install pyyaml)"
                ) from None
            values = yaml.load(text, Loader=_yaml_loader(yaml))  # a SafeLoader subclass
        elif suffix == ".json":
            values = json.loads(text)
        else:
            raise InvalidInputError(
                f"--config {where}: give a .toml, .yaml, .yml or .json file, not {suffix or 'none'}"
            )
    except InvalidInputError:
        raise
    except Exception as e:  # the parsers' errors name the line and column
        raise InvalidInputError(f"--config {where}: {e}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise InvalidInputError(
            f"--config {where}: the file holds a {type(values).__name__}, not a mapping of "
            "option names to values"
        )
    return values


# generate's KV caches that need no configuration of their own (transformers'
# names; TransformersEngine checks any other against its list).
_CACHE_IMPLEMENTATIONS = ("dynamic", "static", "offloaded", "offloaded_static")
_CACHE_IMPLEMENTATION_HELP = (
    "with --engine transformers: generate's KV cache; static is compiled into CUDA graphs on a "
    "GPU, several times faster decoding after a few minutes of compiling (default: dynamic)"
)

# Options that take a comma-separated list, which a config file may give as a list.
_COMMA_OPTIONS = frozenset({"tasks", "eval-tasks", "report-to", "lora-targets"})


def _config_tokens(
    command: argparse.ArgumentParser, values: Mapping[str, Any], where: str, name: str
) -> list[str]:
    """Command-line tokens for the options in a config file, each value checked
    against the command's option as the command line would check it."""
    import difflib

    from turnrl.exceptions import InvalidInputError

    actions = {
        option[2:]: action
        for action in command._actions
        for option in action.option_strings
        if option.startswith("--") and option not in ("--help", "--config", "--version")
    }
    tokens: list[str] = []
    given: dict[int, str] = {}  # by action, as an option may have two names
    for key, value in values.items():
        option = str(key).replace("_", "-")
        action = actions.get(option)
        if action is None:
            close = difflib.get_close_matches(option, list(actions), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidInputError(f"--config {where}: {key!r} is not an option of {name}{hint}")
        if id(action) in given:
            raise InvalidInputError(
                f"--config {where}: {given[id(action)]!r} and {key!r} are one option"
            )
        given[id(action)] = str(key)
        flag = f"--{option}"

        def checked(text: str, action: argparse.Action = action, key: Any = key) -> str:
            """``text`` once the option's own type and choices take it."""
            value: Any = text
            if action.type is not None:
                try:
                    value = action.type(text)  # type: ignore[operator]
                except argparse.ArgumentTypeError as e:
                    raise InvalidInputError(f"--config {where}: {key}: {e}") from None
                except (ValueError, TypeError):  # argparse's own wording
                    kind = getattr(action.type, "__name__", "")
                    raise InvalidInputError(
                        f"--config {where}: {key}: invalid {kind} value: {text!r}"
                    ) from None
            if action.choices is not None and value not in action.choices:
                choices = ", ".join(map(str, action.choices))
                raise InvalidInputError(
                    f"--config {where}: {key}: {text!r} is not one of {choices}"
                )
            return text

        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise InvalidInputError(
                    f"--config {where}: {key} is a switch, true or false; got {value!r}"
                )
            if value:
                tokens.append(flag)
            continue
        # Not every choice of "none" is off: --norm none is a norm, not --norm's default.
        takes_none = action.type in (_grad_norm, _logger_names) or (
            action.dest in _CHOICES_OFF_AS_NONE
        )
        if value is None and (takes_none or hasattr(action.type, "__wrapped__")):
            value = "none"  # JSON's and YAML's null for an option that takes none
        if isinstance(value, (bool, dict)) or value is None:
            raise InvalidInputError(
                f"--config {where}: {key} takes a value like the command line's; got {value!r}"
            )
        integral = getattr(action.type, "__wrapped__", action.type) in (
            int,
            _positive_int,
            _non_negative_int,
            _row_length,
            _top_k,
        )
        if isinstance(value, float) and value.is_integer() and integral:
            value = int(value)  # 1e3 for --steps
        if isinstance(value, list):
            several = action.nargs in ("+", "*")
            if not several and option not in _COMMA_OPTIONS:
                raise InvalidInputError(f"--config {where}: {key} takes one value, not a list")
            if not value and option != "report-to":  # --tasks "" would mean all of them
                raise InvalidInputError(f"--config {where}: {key} is an empty list")
            if several:
                tokens += [flag, *(checked(str(v)) for v in value)]
                continue
            value = ",".join(str(v) for v in value)
        # One token, so that a value starting with "-" (-1e-05, -5:) is not read as an option.
        tokens.append(f"{flag}={checked(str(value))}")
    return tokens


def expand_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--config FILE`` replaced by the file's options, put right
    after the command words so that options given on the command line win."""
    from turnrl.exceptions import InvalidInputError

    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        return argv  # help needs no file, even a broken one
    for token in argv:
        # The parser takes no abbreviations; this says which option --conf was meant to be.
        written = token.partition("=")[0]
        if written != "--config" and len(written) > 3 and "--config".startswith(written):
            raise InvalidInputError(f"{written}: spell --config in full")
    at = next(
        (i for i, token in enumerate(argv) if token == "--config" or token.startswith("--config=")),
        None,
    )
    if at is None:
        return argv
    if argv[at] == "--config":
        if at + 1 >= len(argv):
            raise InvalidInputError("--config needs a file")
        path, rest = argv[at + 1], argv[:at] + argv[at + 2 :]
    else:
        path, rest = argv[at].partition("=")[2], argv[:at] + argv[at + 1 :]
    if any(token == "--config" or token.startswith("--config=") for token in rest):
        raise InvalidInputError("give --config once")
    words, command = _command(parser, argv)  # they stop at --config when it comes first
    if not words or _subparsers(command) is not None:
        raise InvalidInputError(
            "--config goes after a command, e.g. turnrl train --config run.toml"
        )
    name = "turnrl " + " ".join(words)
    tokens = _config_tokens(command, read_config(path), path, name)
    # --config stays, so that the run's recorded options name the file.
    return [*words, *tokens, *rest[len(words) :], "--config", path]


#: The exit status of a command whose stdout's reader has gone (``| head``):
#: 128 + SIGPIPE, as the shell reports a tool the signal ends.
CLOSED_STDOUT_STATUS = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``turnrl`` command. Errors in the input (missing
    files, bad tier files, no usable lines) and outputs that cannot be
    written print one line and exit 2. A stdout whose reader has gone (``turnrl
    rollouts stats ... | head``) ends the command quietly with status 141,
    unless the command failed too: its error (a traceback, an interrupt, a
    status other than 0) is what it ends with then."""
    try:
        status = _main(argv)
    except BrokenPipeError:  # stdout's: _main reports any other
        _discard_stdout()
        return CLOSED_STDOUT_STATUS
    except BaseException:
        # The command's own failure is the one to report: a flush failing
        # as well must not turn it into a quiet 141.
        try:
            sys.stdout.flush()
        except OSError:
            _discard_stdout()
        raise
    try:
        sys.stdout.flush()  # a reader gone shows here, not at the interpreter's exit
    except BrokenPipeError:
        _discard_stdout()
        # A failure's status (2, its error said on stderr) says more than the pipe's.
        return status or CLOSED_STDOUT_STATUS
    return status


def _discard_stdout() -> None:
    """Send the rest of stdout's output to devnull, as Python's documentation
    advises for a reader gone, so that the flush at exit does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _main(argv: Sequence[str] | None) -> int:
    from turnrl.exceptions import TurnrlError

    parser = build_parser()
    given = list(sys.argv[1:] if argv is None else argv)
    try:
        expanded = expand_config(parser, given)
    except TurnrlError as err:
        print(f"turnrl: error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(expanded)
    try:
        return int(args.run(args))
    except (TurnrlError, OSError) as err:  # OSError: an output that cannot be written
        if isinstance(err, BrokenPipeError) and _stdout_gone():
            raise
        command = " ".join(filter(None, (args.command, getattr(args, "rollouts_command", None))))
        print(f"turnrl {command}: error: {err}", file=sys.stderr)
        return 2


def _stdout_gone() -> bool:
    """Whether stdout is a pipe (or socket) its reader has closed: what a
    BrokenPipeError from printing means, and one from elsewhere (a socket of
    the command's own) does not."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture)
        return False
    try:
        import select

        poller = select.poll()
    except (ImportError, AttributeError):  # no poll (Windows): taken as stdout's
        return True
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


if __name__ == "__main__":
    sys.exit(main())

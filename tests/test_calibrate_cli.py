"""`turnrl calibrate` end to end on generated buffers (plain, zstd, bad lines)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import turnrl
from turnrl.calibration import DEFAULT_TIERS, TierStats, load_tier_rewards, save_tier_rewards
from turnrl.cli import main
from turnrl.exceptions import InvalidInputError, TurnrlIOError
from turnrl.irc import load_buffers, read_shard
from turnrl.rollouts import RolloutWriter, expand_paths


def planted_records(seed: int, tasks: int, step: int = 0):
    """gold predicts success, error predicts failure, read is noise."""
    rng = np.random.default_rng(seed)
    for task in range(tasks):
        for sample in range(8):
            success = bool(rng.uniform() < 0.5)
            tiers = list(rng.choice(["read", "respond"], size=rng.integers(2, 6)))
            if success and rng.uniform() < 0.9:
                tiers[rng.integers(len(tiers))] = "gold"
            if not success and rng.uniform() < 0.9:
                tiers[rng.integers(len(tiers))] = "error"
            turns = []
            for tier in tiers:
                turns.append(
                    {
                        "role": "assistant",
                        "content": "ok",
                        "tool_calls": [],
                        "tier": str(tier),
                        "reward": 0.0,
                    }
                )
                turns.append({"role": "user", "content": "go on"})
            yield {
                "schema": "turnrl.rollout/1",
                "task_id": f"synthetic/{task}",
                "group": f"step-{step}/synthetic/{task}",
                "sample": sample,
                "outcome": 1.0 if success else 0.0,
                "turns": turns,
                "meta": {},
            }


@pytest.fixture()
def buffers(tmp_path: Path):
    plain = tmp_path / "step0.jsonl"
    lines = [json.dumps(r) for r in planted_records(0, 60, step=0)]
    lines.insert(5, '{"schema": "turnrl.rollout/1", "task_id": ')  # truncated line
    lines.insert(9, '{"schema": "other/9"}')
    plain.write_text("\n".join(lines) + "\n")
    packed = tmp_path / "step1.jsonl.zst"
    with RolloutWriter(packed, compress="zstd") as writer:
        for record in planted_records(1, 60, step=1):
            writer.write(record)
    return tmp_path, plain, packed


def test_calibrate_writes_rewards_report_and_plot(buffers, capsys):
    folder, plain, _ = buffers
    out, report, plot = folder / "cal.toml", folder / "report.json", folder / "report.png"
    code = main(
        [
            "calibrate",
            str(folder / "step*.jsonl*"),
            "--tiers",
            "naive",
            "--out",
            str(out),
            "--report",
            str(report),
            "--plot",
            str(plot),
            "--quiet",
        ]
    )
    assert code == 0
    rewards = load_tier_rewards(out)
    assert rewards["gold"] > 0 > rewards["error"]
    assert rewards["read"] == 0.0 and rewards["respond"] == 0.0
    data = json.loads(report.read_text())
    assert data["skipped_lines"] == 2
    assert any(p.startswith(f"{plain}:6:") for p in data["problems"])
    assert data["trajectories"] == 2 * 60 * 8
    assert data["iterations"][0]["index"] == 1 and data["converged"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    captured = capsys.readouterr()
    assert "skipped 2 bad line(s)" in captured.err
    assert "gold" in captured.out and "misaligned turns:" in captured.out


def test_sharded_loading_equals_one_file(buffers, tmp_path: Path):
    _, plain, packed = buffers
    merged_rollouts, merged_stats, shards = load_buffers([str(plain), str(packed)], workers=2)
    assert len(shards) == 2
    both = tmp_path / "both.jsonl"
    records = list(planted_records(0, 60, 0)) + list(planted_records(1, 60, 1))
    both.write_text("".join(json.dumps(r) + "\n" for r in records))
    single_rollouts, single_stats, _ = load_buffers([str(both)], workers=1)
    assert merged_stats == single_stats
    assert merged_stats == TierStats.from_rollouts(single_rollouts)
    np.testing.assert_array_equal(merged_rollouts.turn_tiers, single_rollouts.turn_tiers)
    np.testing.assert_array_equal(merged_rollouts.group, single_rollouts.group)


def test_groups_spanning_files_are_merged(tmp_path: Path):
    records = list(planted_records(2, 10, 0))
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in records[::2]))
    second.write_text("".join(json.dumps(r) + "\n" for r in records[1::2]))
    rollouts, _, _ = load_buffers([str(first), str(second)])
    assert len(np.unique(rollouts.group)) == 10
    assert np.bincount(rollouts.group).tolist() == [8] * 10


def test_empty_and_missing_inputs_fail_clearly(tmp_path: Path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["calibrate", str(empty), "--quiet"]) == 2
    assert "no trajectories" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path / "nope*.jsonl"), "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err
    bad_tiers = tmp_path / "t.toml"
    bad_tiers.write_text("[tiers]\ngold = 'x'\n")
    assert main(["calibrate", str(empty), "--tiers", str(bad_tiers), "--quiet"]) == 2
    assert "t.toml: tier 'gold'" in capsys.readouterr().err


def test_a_file_named_twice_is_read_once(buffers, capsys):
    """Read twice, every trajectory would count twice and shrink every p-value."""
    folder, plain, packed = buffers
    once, _, _ = load_buffers([str(plain), str(packed)])
    link = folder / "again.jsonl"
    link.symlink_to(plain)
    hard = folder / "hard.jsonl"
    os.link(plain, hard)
    argv = ["calibrate", str(plain), str(folder / "step*.jsonl*"), str(link), str(hard), "--quiet"]
    assert main(argv) == 0
    assert f"{len(once.outcome)} trajectories" in capsys.readouterr().out
    assert expand_paths([plain, str(folder / "step0.*"), link]) == [str(plain)]


def test_a_number_the_estimators_cannot_take_is_a_bad_line(tmp_path: Path, capsys):
    """1e101 is finite JSON, but beyond what the estimators' sums take: its line
    is skipped with file:line and the run goes on (it used to stop the run)."""
    records = [json.dumps(r) for r in planted_records(3, 10)]
    records[4] = (
        records[4]
        .replace('"outcome": 1.0', '"outcome": 1e101')
        .replace('"outcome": 0.0', '"outcome": -1e101')
    )
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(records) + "\n")
    assert main(["calibrate", str(path), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert f"{path}:5: bad record: outcome: number out of range" in captured.err
    assert f"{10 * 8 - 1} trajectories" in captured.out


def test_the_bad_lines_note_says_how_many_the_report_lists(tmp_path: Path, capsys):
    """The reader keeps the first 1000 problems of a file: past them, the note
    on stderr does not say that --report lists every bad line."""
    good = [json.dumps(r) for r in planted_records(4, 2)]
    few, many = tmp_path / "few.jsonl", tmp_path / "many.jsonl"
    few.write_text("\n".join([*good, "{bad"]) + "\n")
    many.write_text("\n".join([*good, *["{bad"] * 1005]) + "\n")
    report = tmp_path / "report.json"
    assert main(["calibrate", str(few), str(many), "--quiet", "--report", str(report)]) == 0
    err = capsys.readouterr().err
    written = json.loads(report.read_text())
    assert written["skipped_lines"] == 1006 and len(written["problems"]) == 1001
    assert "all listed" not in err
    assert "... and 986 more (--report lists 1001 of the 1006: at most 1000 per file)" in err
    assert main(["calibrate", str(few), "--quiet"]) == 0
    assert "skipped 1 bad line(s):" in capsys.readouterr().err
    twenty_one = tmp_path / "twenty_one.jsonl"
    twenty_one.write_text("\n".join([*good, *["{bad"] * 21]) + "\n")
    assert main(["calibrate", str(twenty_one), "--quiet"]) == 0
    assert "... and 1 more (all listed in --report)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options",
    [
        {"gamma": 0.5},
        {"lam": 2.0, "norm": "mean"},
        {"norm": "none", "turn_norm": "pooled", "estimator": "mt_grpo"},
    ],
)
def test_estimator_options_reach_the_direction_check(buffers, tmp_path: Path, options):
    from turnrl.calibration import calibrate
    from turnrl.irc import tiered_from_batch

    _, plain, packed = buffers
    argv = ["calibrate", str(plain), str(packed), "--quiet"]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    assert main([*argv, "--report", str(tmp_path / "with.json")]) == 0
    assert main([*argv[:4], "--report", str(tmp_path / "without.json")]) == 0
    batch = turnrl.read_rollouts([plain, packed])
    want = calibrate(tiered_from_batch(batch), **options)
    got = json.loads((tmp_path / "with.json").read_text())
    default = json.loads((tmp_path / "without.json").read_text())

    def advantages(report: dict) -> list[float]:
        return [d["mean_advantage"] for d in report["initial"]["tiers"]]

    assert advantages(got) == pytest.approx([d.mean_advantage for d in want.initial.directions])
    assert advantages(got) != pytest.approx(advantages(default))
    assert got["rewards"] == want.rewards
    # The report says which settings it was made with.
    given = {k: v for k, v in options.items() if k != "estimator"}
    assert got["estimator_params"] == {"turn_norm": "position", **given}
    assert got["estimator"] == options.get("estimator", "gtpo_hybrid")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--target", "-1", "--target: must be above 0"),
        ("--target", "nan", "--target: must be a finite number"),
        ("--alpha", "0", "--alpha: must be above 0"),
        ("--min-abs-r", "-0.1", "--min-abs-r: must be at least 0"),
        ("--success-threshold", "nan", "--success-threshold: must be a finite number"),
        # Was refused only after every buffer had been read, however large.
        ("--max-iterations", "0", "--max-iterations: must be at least 1"),
        # As rollouts stats checks it; was refused after the estimator check, as
        # "workers must be at least 1", the library's word.
        ("--workers", "0", "--workers: must be at least 1"),
    ],
)
def test_option_values_are_checked(buffers, capsys, option, value, message):
    _, plain, _ = buffers
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", str(plain), option, value, "--quiet"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--lam", "1e308", "lam must be at most 1e100 in size"),
        ("--gamma", "2", "gamma is a discount factor"),
    ],
)
def test_estimator_settings_it_refuses_fail_in_one_line(
    buffers, tmp_path: Path, capsys, option, value, message
):
    """--lam 1e308 gave inf advantages and died in json.dump with a traceback."""
    _, plain, _ = buffers
    report = tmp_path / "r.json"
    assert main(["calibrate", str(plain), option, value, "--report", str(report)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert "trajectories" not in captured.out  # refused before the buffers are read
    assert not report.exists()


def test_outputs_that_cannot_be_written_fail_in_one_line(buffers, tmp_path: Path, capsys):
    _, plain, _ = buffers
    for option in ("--out", "--report", "--plot"):
        assert main(["calibrate", str(plain), option, str(tmp_path), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"{option} {tmp_path}: is a folder" in err and "Traceback" not in err
    under_a_file = str(plain / "x.toml")
    assert main(["calibrate", str(plain), "--out", under_a_file, "--quiet"]) == 2
    captured = capsys.readouterr()
    assert f"{plain} is a file, not a folder" in captured.err
    assert captured.out == ""  # refused before the calibration, not after it
    # A plot is a PNG at exactly the name given, whatever its suffix.
    for name in ("plot", "plot.txt"):
        assert main(["calibrate", str(plain), "--plot", str(tmp_path / name), "--quiet"]) == 0
        assert f"wrote {tmp_path / name}" in capsys.readouterr().out
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_output_naming_an_input_or_another_output_is_refused(
    buffers, tmp_path: Path, capsys, monkeypatch
):
    """--report over one of its own buffers replaced the rollouts with the report."""
    folder, plain, packed = buffers
    (folder / "link.jsonl.zst").symlink_to(packed)
    monkeypatch.chdir(folder)
    before = {p: p.read_bytes() for p in (plain, packed)}
    inputs = [str(folder / "step*.jsonl*")]
    for option, target, named in (
        ("--out", str(plain), plain),
        ("--report", "step0.jsonl", plain),  # relative
        ("--plot", "./link.jsonl.zst", packed),  # a link to it
    ):
        assert main(["calibrate", *inputs, option, target, "--quiet"]) == 2
        captured = capsys.readouterr()
        assert captured.err == (
            f"turnrl calibrate: error: {option} {target}: the output cannot replace the "
            f"input buffer ({named})\n"
        )
        assert captured.out == ""  # refused before reading
    assert {p: p.read_bytes() for p in (plain, packed)} == before
    # Two outputs under one name: the later would replace the earlier.
    assert main(["calibrate", *inputs, "--out", "c.toml", "--report", "./c.toml"]) == 2
    assert capsys.readouterr().err == (
        "turnrl calibrate: error: --report ./c.toml: --out c.toml writes the same file; give "
        "each output its own name\n"
    )
    assert not (folder / "c.toml").exists()


def test_a_report_or_plot_naming_the_tiers_file_is_refused(buffers, tmp_path: Path, capsys):
    """--report or --plot over the --tiers file replaced the reward table with a
    JSON report or a PNG; --out over it writes the calibrated table in its place."""
    _, plain, _ = buffers
    tiers = tmp_path / "tiers.toml"
    save_tier_rewards(load_tier_rewards("naive"), tiers)
    before = tiers.read_bytes()
    argv = ["calibrate", str(plain), "--tiers", str(tiers), "--quiet"]
    (tmp_path / "link.toml").symlink_to(tiers)
    for option, target in (("--report", str(tiers)), ("--plot", str(tmp_path / "link.toml"))):
        assert main([*argv, option, target]) == 2
        captured = capsys.readouterr()
        assert captured.err == (
            f"turnrl calibrate: error: {option} {target}: the output cannot replace the "
            f"--tiers file ({tiers})\n"
        )
        assert captured.out == ""  # refused before reading
        assert tiers.read_bytes() == before
    assert main([*argv, "--out", str(tiers)]) == 0
    assert f"wrote {tiers}" in capsys.readouterr().out
    assert set(load_tier_rewards(tiers)) == set(DEFAULT_TIERS)


def test_misaligned_counts_do_not_depend_on_file_order(tmp_path: Path, capsys):
    """A turn whose return equals its group's mean has advantage 0 in exact
    arithmetic; rounding gave it a sign that depended on the group's order."""

    def turns(*tiers):
        return [{"role": "assistant", "content": "", "tier": t, "reward": 0.0} for t in tiers]

    def record(task, sample, outcome, tiers):
        return {
            "schema": "turnrl.rollout/1",
            "task_id": task,
            "group": task,
            "sample": sample,
            "outcome": outcome,
            "turns": turns(*tiers),
            "meta": {},
        }

    # An all-fail group whose hybrid returns at turn 1 are 1.0, 0.9 and 0.95
    # (naive rewards): sample 4's soft turn sits exactly on the mean.
    failed = [
        ("read",),
        ("write", "gold"),
        ("write",),
        ("soft", "respond", "gold"),
        ("respond", "soft", "soft"),
    ]
    first = [record("t0", s, 0.0, failed[s]) for s in (0, 2, 4)]
    second = [record("t0", s, 0.0, failed[s]) for s in (1, 3)]
    for k in range(1, 13):  # soft against success
        first += [record(f"t{k}", 0, 1.0, ("gold",)), record(f"t{k}", 1, 0.0, ("soft",))]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in first))
    b.write_text("".join(json.dumps(r) + "\n" for r in second))
    outputs = []
    for order in ([a, b], [b, a]):
        assert main(["calibrate", *map(str, order), "--quiet"]) == 0
        out = capsys.readouterr().out
        outputs.append(
            [line for line in out.splitlines() if "misaligned" in line or "soft" in line]
        )
    assert outputs[0] == outputs[1]


def test_calibrated_rewards_do_not_depend_on_file_order(tmp_path: Path, capsys):
    """Groups whose read turns' mean advantage is 0 in exact arithmetic (every
    member makes one read call; mt_grpo), split over two files: `a b` wrote
    read = 1.5 and `b a` read = 0.0, the mean's sign being rounding noise."""

    def record(g, sample, outcome, tier):
        turn = {"role": "assistant", "content": "x", "tier": tier, "reward": 0.0}
        return {
            "schema": "turnrl.rollout/1",
            "task_id": f"t{g}",
            "group": f"s/t{g}",
            "sample": sample,
            "outcome": outcome,
            "turns": [turn],
            "meta": {},
        }

    first, second = [], []
    for g in range(10):
        for m, outcome in enumerate((0.0, 0.2, 0.1, 0.5, 0.3)):
            (first if m in (0, 1, 3) else second).append(record(g, m, outcome, "read"))
    for g in range(10, 20):
        first += [record(g, m, o, "write") for m, o in enumerate((0.0, 0.0, 0.1))]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in first))
    b.write_text("".join(json.dumps(r) + "\n" for r in second))
    written = []
    for name, order in (("ab", [a, b]), ("ba", [b, a])):
        out, report = tmp_path / f"{name}.toml", tmp_path / f"{name}.json"
        argv = ["calibrate", *map(str, order), "--estimator", "mt_grpo"]
        argv += ["--success-threshold", "0.3", "--quiet", "--out", str(out)]
        assert main([*argv, "--report", str(report)]) == 0
        data = json.loads(report.read_text())
        del data["inputs"]
        written.append((out.read_text(), data))
    capsys.readouterr()
    assert written[0] == written[1]
    assert load_tier_rewards(tmp_path / "ab.toml")["read"] == 0.0
    assert written[0][1]["converged"]


def test_ray_gives_the_same_answer(buffers, tmp_path: Path):
    ray = pytest.importorskip("ray")
    _, plain, packed = buffers
    local_out, ray_out = tmp_path / "local.toml", tmp_path / "ray.toml"
    assert main(["calibrate", str(plain), str(packed), "--out", str(local_out), "--quiet"]) == 0
    try:
        assert (
            main(
                [
                    "calibrate",
                    str(plain),
                    str(packed),
                    "--out",
                    str(ray_out),
                    "--ray",
                    "local",
                    "--quiet",
                ]
            )
            == 0
        )
    finally:
        ray.shutdown()
    assert load_tier_rewards(local_out) == load_tier_rewards(ray_out)


def test_read_progress_adds_up_to_the_input_bytes(buffers):
    from turnrl.rollouts import read_rollouts

    _, plain, packed = buffers
    deltas: list[int] = []
    batch = read_rollouts([plain, packed], workers=2, on_progress=deltas.append)
    assert batch.num_trajectories == 2 * 60 * 8
    assert all(d > 0 for d in deltas)
    assert sum(deltas) == plain.stat().st_size + packed.stat().st_size


def _write_buffer(path: Path, records: list[dict], compress: str | None) -> None:
    with RolloutWriter(path, compress=compress) as writer:
        for record in records:
            writer.write(record)


@pytest.fixture()
def many_buffers(tmp_path: Path) -> list[str]:
    """Five files, plain and zstd mixed, with groups that span files, bad
    lines, an empty file and tiers outside the defaults."""
    records = list(planted_records(3, 12, step=0))
    records[3]["turns"][0]["tier"] = "zeta"
    records[40]["turns"][0]["tier"] = "alpha"
    records[70]["turns"][0]["tier"] = "zeta"
    paths = []
    for i, compress in enumerate(["zstd", None, "zstd", None]):
        path = tmp_path / (f"part{i}.jsonl" + (".zst" if compress else ""))
        _write_buffer(path, records[i::4], compress)
        paths.append(path)
    with paths[1].open("a") as fh:
        fh.write('{"schema": "turnrl.rollout/1", "task_id": \n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    paths.insert(2, empty)
    return [str(p) for p in paths]


def _assert_same_rollouts(a, b) -> None:
    assert a.tiers == b.tiers
    for name in ("outcome", "group", "turn_offsets", "turn_tiers"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def _assert_same_shards(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (a.files, a.group_names, a.bytes_read, a.skipped, a.problems) == (
            b.files,
            b.group_names,
            b.bytes_read,
            b.skipped,
            b.problems,
        )
        _assert_same_rollouts(a.rollouts, b.rollouts)


@pytest.mark.parametrize("workers", [None, 2, 3, 8])
def test_concurrent_loading_equals_reading_files_one_at_a_time(many_buffers, workers):
    one_by_one = [read_shard([p], 1) for p in many_buffers]
    sequential, sequential_stats, sequential_shards = load_buffers(many_buffers, workers=1)
    _assert_same_shards(sequential_shards, one_by_one)
    deltas: list[int] = []
    merged, stats, shards = load_buffers(many_buffers, workers=workers, progress=deltas.append)
    _assert_same_shards(shards, one_by_one)
    _assert_same_rollouts(merged, sequential)
    assert stats == sequential_stats
    assert merged.tiers == (*DEFAULT_TIERS, "alpha", "zeta")  # first seen in file order
    assert sum(s.skipped for s in shards) == 1 and shards[1].problems
    assert sum(deltas) == sum(Path(p).stat().st_size for p in many_buffers)


def test_files_are_read_concurrently_and_kept_in_input_order(many_buffers, monkeypatch):
    """The first file's read waits for the second one's to finish: it passes
    only when reads overlap, and the second shard finishing first must still
    come back second."""
    import turnrl.irc

    real = turnrl.irc.read_shard
    second_done = threading.Event()
    lock = threading.Lock()
    state = {"in_flight": 0, "most": 0, "waited": None, "threads": set()}
    progress_lock = threading.Lock()
    overlapping_progress: list[int] = []

    def slow_read(paths, workers=1, on_progress=None):
        with lock:
            state["in_flight"] += 1
            state["most"] = max(state["most"], state["in_flight"])
            state["threads"].add(threading.get_ident())
        try:
            if paths == [many_buffers[0]]:
                state["waited"] = second_done.wait(timeout=5)
            shard = real(paths, workers, on_progress)
            if paths == [many_buffers[1]]:
                second_done.set()
            return shard
        finally:
            with lock:
                state["in_flight"] -= 1

    def progress(delta: int) -> None:
        if not progress_lock.acquire(blocking=False):
            overlapping_progress.append(delta)
            return
        try:
            time.sleep(0.001)
        finally:
            progress_lock.release()

    monkeypatch.setattr(turnrl.irc, "read_shard", slow_read)
    _, _, shards = load_buffers(many_buffers, workers=2, progress=progress)
    assert state["waited"] is True, "the files were read one after another"
    assert state["most"] == 2 and len(state["threads"]) == 2
    assert [s.files for s in shards] == [[p] for p in many_buffers]
    assert overlapping_progress == []


def test_concurrent_loading_reports_the_first_bad_file_in_input_order(many_buffers, tmp_path):
    missing = [str(tmp_path / "missing-a.jsonl"), str(tmp_path / "missing-b.jsonl")]
    paths = [many_buffers[0], missing[0], many_buffers[1], missing[1]]
    for workers in (1, 4, None):
        with pytest.raises(TurnrlIOError, match="missing-a"):
            load_buffers(paths, workers=workers)
    with pytest.raises(InvalidInputError, match="workers must be at least 1, got 0"):
        load_buffers(many_buffers, workers=0)


def test_a_perfect_correlation_has_a_degenerate_interval_and_plots(tmp_path: Path, capsys):
    """gold present exactly when the rollout succeeds (r = 1, n = 40): its
    interval is [1, 1]. It was [0.9999999999999981, 0.9999999999999994],
    which excludes r, and --plot died on the negative error bar."""
    path = tmp_path / "perfect.jsonl"
    with path.open("w") as fh:
        for g in range(10):
            for s in range(4):
                ok = s < 2
                turn = {"role": "assistant", "content": "", "tier": "gold" if ok else "error"}
                record = {
                    "schema": "turnrl.rollout/1",
                    "task_id": f"t{g}",
                    "group": f"t{g}",
                    "sample": s,
                    "outcome": 1.0 if ok else 0.0,
                    "turns": [turn],
                    "meta": {},
                }
                fh.write(json.dumps(record) + "\n")
    report, plot = tmp_path / "report.json", tmp_path / "report.png"
    argv = ["calibrate", str(path), "--quiet", "--report", str(report), "--plot", str(plot)]
    assert main(argv) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_tier = {c["tier"]: c for c in json.loads(report.read_text())["correlations"]}
    for tier, r in (("gold", 1.0), ("error", -1.0)):
        assert (by_tier[tier]["r"], by_tier[tier]["ci_low"], by_tier[tier]["ci_high"]) == (r, r, r)


def test_plot_never_passes_negative_error_bars(tmp_path: Path):
    """Whatever interval a report holds, the plot draws it."""
    import dataclasses

    from turnrl.calibration import calibrate
    from turnrl.irc import plot_report, tiered_from_batch

    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in planted_records(0, 20)))
    report = calibrate(tiered_from_batch(turnrl.read_rollouts(path)))
    # An interval that misses r on either side.
    shifted = [
        dataclasses.replace(c, ci_low=c.r + 0.01, ci_high=c.r - 0.01) for c in report.correlations
    ]
    plot_report(dataclasses.replace(report, correlations=shifted), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_interrupted_plot_leaves_the_old_one(tmp_path: Path, monkeypatch):
    """--plot is written beside its name and renamed over it, as --out and
    --report are: Ctrl-C while saving left part of a PNG over the old plot."""
    import matplotlib.figure

    from turnrl.calibration import calibrate
    from turnrl.irc import plot_report, tiered_from_batch

    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in planted_records(0, 20)))
    report = calibrate(tiered_from_batch(turnrl.read_rollouts(path)))
    plot = tmp_path / "plots" / "p.png"
    plot_report(report, plot)
    old = plot.read_bytes()

    def savefig(self, target, **kwargs):
        part = b"\x89PNG\r\n\x1a\n"  # the start of a PNG, as an interrupted save leaves
        if isinstance(target, (str, os.PathLike)):
            Path(target).write_bytes(part)
        else:
            target.write(part)
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    with pytest.raises(KeyboardInterrupt):
        plot_report(report, plot)
    assert plot.read_bytes() == old
    assert [p.name for p in plot.parent.iterdir()] == ["p.png"]  # no temporary file left


def _drawn_errorbars(monkeypatch) -> list[np.ndarray]:
    """The ``yerr`` of every error bar the plots draw from now on, in order."""
    import matplotlib.axes

    drawn: list[np.ndarray] = []
    real = matplotlib.axes.Axes.errorbar

    def errorbar(self, x, y, yerr=None, **kwargs):
        drawn.append(np.asarray(yerr))
        return real(self, x, y, yerr=yerr, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", errorbar)
    return drawn


@pytest.mark.parametrize("outcome", [0.0, 1.0])
def test_plot_draws_no_interval_when_no_rollout_succeeded_or_all_did(
    tmp_path: Path, monkeypatch, outcome
):
    """No success (early training) or no failure: every r is undefined (0).
    The plot drew the interval of an r of 0 measured on n rollouts around
    each tier, +-0.2 at n = 100, as if the data said the relation was small."""

    from turnrl.calibration import calibrate
    from turnrl.irc import plot_report, tiered_from_batch

    path = tmp_path / "flat.jsonl"
    records = [{**r, "outcome": outcome} for r in planted_records(0, 20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = calibrate(tiered_from_batch(turnrl.read_rollouts(path)))
    assert {c.r for c in report.correlations} == {0.0}
    drawn = _drawn_errorbars(monkeypatch)
    plot_report(report, tmp_path / "p.png")
    (yerr,) = drawn
    assert yerr.shape == (2, len(report.correlations)) and not yerr.any()


@pytest.mark.parametrize(("outcome", "which"), [(0.0, "no trajectory"), (1.0, "every trajectory")])
def test_calibrate_warns_when_success_does_not_vary(tmp_path: Path, capsys, outcome, which):
    """With one outcome throughout, every r_pb is undefined and every reward
    comes out 0: said on stderr, with the threshold that decided success,
    while the rewards are still written."""
    path = tmp_path / "flat.jsonl"
    records = [{**r, "outcome": outcome} for r in planted_records(0, 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out, report = tmp_path / "tiers.toml", tmp_path / "report.json"
    assert (
        main(["calibrate", str(path), "--quiet", "--out", str(out), "--report", str(report)]) == 0
    )
    err = capsys.readouterr().err
    assert f"warning: {which} of 40 succeeded" in err and "--success-threshold 1" in err
    assert set(load_tier_rewards(str(out)).values()) == {0.0}
    # The report keeps the warning (the line after "warning: ").
    (warning,) = json.loads(report.read_text())["warnings"]
    assert warning.startswith(f"{which} of 40 succeeded") and warning in err
    # Mixed outcomes: no warning.
    path.write_text("".join(json.dumps(r) + "\n" for r in planted_records(0, 5)))
    assert main(["calibrate", str(path), "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_calibrate_warns_when_no_turn_has_a_tier(tmp_path: Path, capsys):
    """Buffers without tiers (an unlabelled export) calibrated to all-zero rewards
    and "converged", with no word of why."""
    path = tmp_path / "untiered.jsonl"
    records = list(planted_records(0, 5))
    for record in records:
        for turn in record["turns"]:
            turn.pop("tier", None)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out, report = tmp_path / "tiers.toml", tmp_path / "report.json"
    assert (
        main(["calibrate", str(path), "--quiet", "--out", str(out), "--report", str(report)]) == 0
    )
    turns = sum(len(r["turns"]) // 2 for r in records)
    warning = (
        f"none of the {turns} assistant turns has a tier: there is nothing to calibrate, and "
        "every calibrated tier reward is 0; give buffers with tier-labelled turns, as turnrl "
        "rollouts collect and import-taubench write them"
    )
    assert capsys.readouterr().err == f"turnrl calibrate: warning: {warning}\n"
    assert set(load_tier_rewards(str(out)).values()) == {0.0}
    assert json.loads(report.read_text())["warnings"] == [warning]
    # No assistant turn at all: the same.
    for record in records:
        record["turns"] = [t for t in record["turns"] if t["role"] != "assistant"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["calibrate", str(path), "--quiet"]) == 0
    assert "warning: no assistant turns: there is nothing to calibrate" in capsys.readouterr().err
    # Tiered buffers: no warning, and an empty list in the report.
    path.write_text("".join(json.dumps(r) + "\n" for r in planted_records(0, 5)))
    assert main(["calibrate", str(path), "--quiet", "--report", str(report)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads(report.read_text())["warnings"] == []


def test_plot_greys_correlations_by_the_calibration_alpha(tmp_path: Path, monkeypatch):
    """The bars' colours follow --alpha: a tier significant at 0.05 but not
    at 1e-60 was blue in a plot of a calibration run at --alpha 1e-60."""
    import matplotlib.axes

    from turnrl.calibration import calibrate
    from turnrl.irc import plot_report, tiered_from_batch

    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in planted_records(0, 20)))
    report = calibrate(tiered_from_batch(turnrl.read_rollouts(path)))
    p_values = [c.p_value for c in report.correlations]
    colours = []
    real = matplotlib.axes.Axes.bar

    def bar(self, x, height, *args, color=None, **kwargs):
        colours.append(color)
        return real(self, x, height, *args, color=color, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    for alpha in (0.05, 1e-60, 1.0):
        colours.clear()
        plot_report(report, tmp_path / "p.png", alpha=alpha)
        expected = ["tab:blue" if p < alpha else "tab:gray" for p in p_values]
        assert list(colours[0]) == expected
    # Some tier tells the two levels apart.
    assert any(1e-60 <= p < 0.05 for p in p_values)


def test_a_tier_the_starting_table_lacks_is_shown_missing(tmp_path: Path, capsys, monkeypatch):
    """The before/after table and the plot showed a tier the --tiers table lacks
    as reward +0.000, a reward nobody gave it."""
    import matplotlib.axes

    from turnrl.calibration import calibrate
    from turnrl.irc import plot_report, tiered_from_batch

    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in planted_records(0, 20)))
    start = tmp_path / "start.toml"
    start.write_text("[tiers]\ngold = 1.0\nread = 0.0\n")
    assert main(["calibrate", str(path), "--tiers", str(start), "--quiet"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:8]}
    assert set(rows) == set(DEFAULT_TIERS)
    # Columns: tier, present, succ with, succ w/o, r, p, old, new, misaligned ...
    for tier, row in rows.items():
        assert row[6] == ("+1.000" if tier == "gold" else "+0.000" if tier == "read" else "—")
        assert row[7] != "—"
    report = calibrate(tiered_from_batch(turnrl.read_rollouts(path)), str(start))
    heights, dashes = [], []
    real_bar, real_annotate = matplotlib.axes.Axes.bar, matplotlib.axes.Axes.annotate

    def bar(self, x, height, *args, **kwargs):
        heights.append(np.asarray(height, dtype=float))
        return real_bar(self, x, height, *args, **kwargs)

    def annotate(self, text, xy, *args, **kwargs):
        dashes.append((text, float(xy[0])))
        return real_annotate(self, text, xy, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", annotate)
    plot_report(report, tmp_path / "p.png")
    _, before, after = heights
    tiers = [c.tier for c in report.correlations]
    missing = [t not in ("gold", "read") for t in tiers]
    assert np.isnan(before).tolist() == missing and not np.isnan(after).any()
    assert before[tiers.index("gold")] == 1.0 and before[tiers.index("read")] == 0.0
    assert [text for text, _ in dashes] == ["—"] * sum(missing)


def test_plot_draws_the_count_interval_of_a_tier_in_every_rollout(tmp_path: Path, monkeypatch):
    """With --variable count, a tier in every rollout (respond, typically) has a
    defined r when its count varies; the plot took its presence (constant) as
    the variable and drew no interval."""

    from turnrl.calibration import calibrate
    from turnrl.irc import plot_report, tiered_from_batch

    rng = np.random.default_rng(0)
    records = []
    for i in range(80):
        success = bool(i % 2)
        count = int(rng.integers(2, 5) if success else rng.integers(1, 4))
        turns = [{"role": "assistant", "content": ".", "tier": "respond"}] * count
        records.append(turnrl.rollout_record("t", f"g{i // 4}", i, float(success), turns))
    path = tmp_path / "b.jsonl"
    with RolloutWriter(path) as writer:
        writer.write_many(records)
    rollouts = tiered_from_batch(turnrl.read_rollouts(path))
    drawn = _drawn_errorbars(monkeypatch)
    for variable in ("count", "presence"):
        report = calibrate(rollouts, "naive", variable=variable)
        assert report.to_dict()["variable"] == variable
        respond = [c.tier for c in report.correlations].index("respond")
        c = report.correlations[respond]
        drawn.clear()
        plot_report(report, tmp_path / f"{variable}.png")
        (yerr,) = drawn
        if variable == "count":
            assert c.r > 0 and -1 < c.ci_low < c.r < c.ci_high < 1
            assert yerr[:, respond] == pytest.approx([c.r - c.ci_low, c.ci_high - c.r])
        else:  # in every rollout: undefined, no interval
            assert (c.r, c.ci_low, c.ci_high) == (0.0, -1.0, 1.0)
            assert not yerr[:, respond].any()
